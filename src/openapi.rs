//! The OpenAPI 3.0 document of the public API, built from the route table
//! below and served at `/openapi.json`. The checked-in `openapi.json` must
//! equal what this module builds (a unit test compares them; regenerate it
//! with `KEEL_UPDATE_OPENAPI=1 cargo test -p keel --lib openapi`).

use serde_json::Map;
use serde_json::Value;
use serde_json::json;

/// One documented operation.
struct Op {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    /// Name of a schema in `components.schemas` for the JSON body, if any.
    body: Option<&'static str>,
    /// Query parameters (name, schema).
    query: &'static [(&'static str, &'static str)],
    /// Whether `If-Match` / `If-None-Match` / `Idempotency-Key` apply.
    conditional: bool,
    /// Success status and schema name.
    ok: (&'static str, &'static str),
}

const CONSISTENCY: (&str, &str) = ("consistency", "Consistency");

const OPS: &[Op] = &[
    Op {
        method: "get",
        path: "/livez",
        summary: "Liveness probe",
        body: None,
        query: &[],
        conditional: false,
        ok: ("200", "Object"),
    },
    Op {
        method: "get",
        path: "/status",
        summary: "This node's view of the cluster",
        body: None,
        query: &[],
        conditional: false,
        ok: ("200", "Status"),
    },
    Op {
        method: "get",
        path: "/v1/kv",
        summary: "List keys under a prefix",
        body: None,
        query: &[("prefix", "String"), ("limit", "Limit"), CONSISTENCY],
        conditional: false,
        ok: ("200", "List"),
    },
    Op {
        method: "get",
        path: "/v1/kv/{key}",
        summary: "Read a key",
        body: None,
        query: &[CONSISTENCY],
        conditional: false,
        ok: ("200", "KvObject"),
    },
    Op {
        method: "put",
        path: "/v1/kv/{key}",
        summary: "Write a key (any JSON value)",
        body: Some("AnyValue"),
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "delete",
        path: "/v1/kv/{key}",
        summary: "Delete a key",
        body: None,
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "get",
        path: "/v1/workers",
        summary: "List workers",
        body: None,
        query: &[
            ("model", "String"),
            ("label", "String"),
            ("status", "HealthStatus"),
            CONSISTENCY,
        ],
        conditional: false,
        ok: ("200", "List"),
    },
    Op {
        method: "get",
        path: "/v1/workers/{id}",
        summary: "Read a worker",
        body: None,
        query: &[CONSISTENCY],
        conditional: false,
        ok: ("200", "Resource"),
    },
    Op {
        method: "put",
        path: "/v1/workers/{id}",
        summary: "Register or replace a worker",
        body: Some("WorkerInput"),
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "delete",
        path: "/v1/workers/{id}",
        summary: "Remove a worker",
        body: None,
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "post",
        path: "/v1/workers/{id}/heartbeat",
        summary: "Renew a worker's lease",
        body: None,
        query: &[],
        conditional: false,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "post",
        path: "/v1/workers/{id}/health",
        summary: "Record a health-check result",
        body: Some("HealthInput"),
        query: &[],
        conditional: false,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "get",
        path: "/v1/policies",
        summary: "List routing policies",
        body: None,
        query: &[CONSISTENCY],
        conditional: false,
        ok: ("200", "List"),
    },
    Op {
        method: "get",
        path: "/v1/policies/{name}",
        summary: "Read a policy",
        body: None,
        query: &[CONSISTENCY],
        conditional: false,
        ok: ("200", "Resource"),
    },
    Op {
        method: "put",
        path: "/v1/policies/{name}",
        summary: "Create or replace a policy",
        body: Some("PolicyInput"),
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "delete",
        path: "/v1/policies/{name}",
        summary: "Remove a policy",
        body: None,
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "get",
        path: "/v1/affinity/{session}",
        summary: "Read a session's worker",
        body: None,
        query: &[CONSISTENCY],
        conditional: false,
        ok: ("200", "Resource"),
    },
    Op {
        method: "put",
        path: "/v1/affinity/{session}",
        summary: "Stick a session to a worker",
        body: Some("AffinityInput"),
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "delete",
        path: "/v1/affinity/{session}",
        summary: "Forget a session",
        body: None,
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "get",
        path: "/v1/ratelimits",
        summary: "List rate limits",
        body: None,
        query: &[CONSISTENCY],
        conditional: false,
        ok: ("200", "List"),
    },
    Op {
        method: "get",
        path: "/v1/ratelimits/{name}",
        summary: "Read a rate limit",
        body: None,
        query: &[CONSISTENCY],
        conditional: false,
        ok: ("200", "Resource"),
    },
    Op {
        method: "put",
        path: "/v1/ratelimits/{name}",
        summary: "Create or replace a rate limit",
        body: Some("RateLimitInput"),
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "delete",
        path: "/v1/ratelimits/{name}",
        summary: "Remove a rate limit",
        body: None,
        query: &[],
        conditional: true,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "post",
        path: "/v1/ratelimits/{name}/acquire",
        summary: "Take tokens (linearizable)",
        body: Some("AcquireInput"),
        query: &[],
        conditional: false,
        ok: ("200", "AcquireResult"),
    },
    Op {
        method: "get",
        path: "/v1/counters/{name}",
        summary: "Read a counter",
        body: None,
        query: &[CONSISTENCY],
        conditional: false,
        ok: ("200", "Resource"),
    },
    Op {
        method: "post",
        path: "/v1/counters/{name}/add",
        summary: "Add to a counter",
        body: Some("CounterInput"),
        query: &[],
        conditional: false,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "post",
        path: "/v1/txn",
        summary: "Apply operations all-or-nothing under preconditions",
        body: Some("TxnInput"),
        query: &[],
        conditional: false,
        ok: ("200", "WriteResult"),
    },
    Op {
        method: "get",
        path: "/v1/watch",
        summary: "Stream changes as Server-Sent Events",
        body: None,
        query: &[("prefix", "String"), ("from_revision", "Revision")],
        conditional: false,
        ok: ("200", "EventStream"),
    },
];

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn schemas() -> Value {
    let name_s = json!({"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"});
    json!({
        "Object": {"type": "object"},
        "AnyValue": {},
        "String": {"type": "string"},
        "Limit": {"type": "integer", "minimum": 1, "maximum": 10000},
        "Revision": {"type": "integer", "minimum": 0},
        "Consistency": {"type": "string", "enum": ["linearizable", "stale"]},
        "HealthStatus": {"type": "string", "enum": ["unknown", "healthy", "unhealthy"]},
        "Name": name_s,
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}
        },
        "Status": {
            "type": "object",
            "required": ["node_id", "role", "term", "last_log_index", "commit_index", "applied_index", "members"],
            "properties": {
                "node_id": {"type": "integer"}, "role": {"type": "string"}, "term": {"type": "integer"},
                "leader_id": {"type": "integer", "nullable": true}, "last_log_index": {"type": "integer"},
                "commit_index": {"type": "integer"}, "applied_index": {"type": "integer"},
                "snapshot_index": {"type": "integer"}, "purged_index": {"type": "integer"},
                "members": {"type": "array", "items": {"type": "object"}}
            }
        },
        "KvObject": {"type": "object", "required": ["key", "revision", "create_revision", "version"]},
        "Resource": {"type": "object", "required": ["id", "value", "revision", "create_revision", "version"]},
        "List": {"type": "object", "required": ["items", "revision"], "properties": {"items": {"type": "array"}, "revision": {"type": "integer"}}},
        "WriteResult": {"type": "object"},
        "AcquireResult": {"type": "object", "required": ["granted", "remaining"], "properties": {"granted": {"type": "boolean"}, "remaining": {"type": "integer"}}},
        "EventStream": {"type": "string"},
        "WorkerInput": {
            "type": "object", "additionalProperties": false, "required": ["url"],
            "properties": {
                "url": {"type": "string"}, "models": {"type": "array", "items": {"type": "string"}},
                "worker_type": {"type": "string", "enum": ["regular", "prefill", "decode"]},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "priority": {"type": "integer", "minimum": 0}, "cost": {"type": "integer", "minimum": 0},
                "weight": {"type": "integer", "minimum": 0},
                "lease_ttl_ms": {"type": "integer", "minimum": 1000, "maximum": 86400000},
                "breaker": {"type": "object", "additionalProperties": false,
                    "required": ["failure_threshold", "success_threshold", "cooldown_ms"],
                    "properties": {"failure_threshold": {"type": "integer", "minimum": 1},
                        "success_threshold": {"type": "integer", "minimum": 1}, "cooldown_ms": {"type": "integer", "minimum": 0}}}
            }
        },
        "HealthInput": {"type": "object", "additionalProperties": false, "required": ["ok"],
            "properties": {"ok": {"type": "boolean"}, "error": {"type": "string"}}},
        "PolicyInput": {"type": "object", "additionalProperties": false, "required": ["kind"],
            "properties": {"kind": {"type": "string", "enum": ["round_robin", "random", "power_of_two", "least_load", "weighted", "priority", "cache_aware", "consistent_hash"]},
                "params": {"type": "object"}, "weights": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                "model": {"type": "string"}}},
        "AffinityInput": {"type": "object", "additionalProperties": false, "required": ["worker_id", "ttl_ms"],
            "properties": {"worker_id": {"type": "string"}, "ttl_ms": {"type": "integer", "minimum": 1, "maximum": 604800000}}},
        "RateLimitInput": {"oneOf": [
            {"type": "object", "additionalProperties": false, "required": ["kind", "capacity", "refill_per_sec"],
                "properties": {"kind": {"enum": ["token_bucket"]}, "capacity": {"type": "integer", "minimum": 1}, "refill_per_sec": {"type": "number", "minimum": 0}}},
            {"type": "object", "additionalProperties": false, "required": ["kind", "limit", "window_ms"],
                "properties": {"kind": {"enum": ["fixed_window"]}, "limit": {"type": "integer", "minimum": 1}, "window_ms": {"type": "integer", "minimum": 1}}}
        ]},
        "AcquireInput": {"type": "object", "additionalProperties": false, "required": ["tokens"],
            "properties": {"tokens": {"type": "integer", "minimum": 1}, "key": {"type": "string"}}},
        "CounterInput": {"type": "object", "additionalProperties": false, "required": ["delta"], "properties": {"delta": {"type": "integer"}}},
        "TxnInput": {"type": "object", "additionalProperties": false,
            "properties": {"compare": {"type": "array", "items": {"type": "object"}},
                "success": {"type": "array", "items": {"type": "object"}}, "failure": {"type": "array", "items": {"type": "object"}}}}
    })
}

/// Builds the OpenAPI document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in OPS {
        let mut params: Vec<Value> = Vec::new();
        let path_params = op
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')));
        for p in path_params {
            params.push(json!({"name": p, "in": "path", "required": true, "schema": r("Name")}));
        }
        for (q, schema) in op.query {
            params.push(json!({"name": q, "in": "query", "required": false, "schema": r(schema)}));
        }
        if op.conditional {
            params.push(json!({"name": "If-Match", "in": "header", "required": false, "schema": {"type": "string"}}));
            params.push(json!({"name": "If-None-Match", "in": "header", "required": false, "schema": {"type": "string", "enum": ["*"]}}));
            params.push(json!({"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "minLength": 1, "maxLength": 128}}));
        }
        let content_type = if op.ok.1 == "EventStream" {
            "text/event-stream"
        } else {
            "application/json"
        };
        let mut responses = json!({
            op.ok.0: {"description": "success", "content": {content_type: {"schema": r(op.ok.1)}}},
            "default": {"description": "error", "content": {"application/json": {"schema": r("Error")}}}
        });
        if op.method == "put" {
            responses["201"] =
                json!({"description": "created", "content": {"application/json": {"schema": r("WriteResult")}}});
        }
        let mut o = json!({"summary": op.summary, "operationId": format!("{}_{}", op.method, op.path.replace(['/', '{', '}'], "_").trim_matches('_')), "parameters": params, "responses": responses});
        if let Some(b) = op.body {
            o["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": r(b)}}});
        }
        paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("path item is an object")
            .insert(op.method.to_string(), o);
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "keel", "version": env!("CARGO_PKG_VERSION"),
            "description": "Strongly consistent control plane for LLM inference gateways. Errors: {\"error\": {\"code\", \"message\"}}."},
        "paths": paths,
        "components": {"schemas": schemas()}
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_document_is_current() {
        let path = crate::source_file("openapi.json");
        let built = serde_json::to_string_pretty(&super::document()).unwrap() + "\n";
        if std::env::var_os("KEEL_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &built).unwrap();
        }
        let stored = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            stored == built,
            "openapi.json is stale: run KEEL_UPDATE_OPENAPI=1 cargo test -p keel --lib openapi"
        );
    }

    #[test]
    fn every_documented_path_is_unique_per_method() {
        let mut seen = std::collections::BTreeSet::new();
        for op in super::OPS {
            assert!(seen.insert((op.method, op.path)), "{} {} twice", op.method, op.path);
        }
    }
}
