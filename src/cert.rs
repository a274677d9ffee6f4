//! Certificate generation for the `keel cert` command and the local dev cluster.
//!
//! A keel cluster trusts exactly one CA, kept as `ca.pem` and `ca-key.pem` in a
//! directory; every other certificate is signed by it and names its holder with a
//! `keel://` URI SAN (`keel://node/<id>`, `keel://client/<name>` or
//! `keel://admin/<name>`), which `keel_raft::tls` reads back to decide what the
//! holder may do. The CA is loaded back from its two files on every run: the issuer
//! is rebuilt from the fixed keel CA subject and checked byte for byte against
//! `ca.pem`, so a CA that keel did not create is refused with a clear error. Keys
//! are written with mode 0600 through a temporary file, fsync and rename, and no
//! existing file is replaced unless the caller forces it.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;

/// File name of the CA certificate.
const CA_CERT: &str = "ca.pem";
/// File name of the CA private key.
const CA_KEY: &str = "ca-key.pem";
/// Subject common name of every keel CA; loading the CA back relies on it.
const CA_COMMON_NAME: &str = "keel cluster CA";
/// Subject organisation of every keel certificate.
const ORGANIZATION: &str = "keel";
/// How far `not_before` is moved back to tolerate clocks that lag behind ours.
const CLOCK_SKEW: Duration = Duration::hours(1);
/// The longest validity and the largest offset accepted, in days (about 100 years).
const MAX_DAYS: i64 = 36_500;

/// Validity settings of a certificate to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertOptions {
    /// How many days the certificate is valid for, counted from its start.
    pub days: u32,
    /// Days by which the start is moved from now; a negative value with a small `days`
    /// yields an already expired certificate, which tests use.
    pub not_before_offset_days: i64,
}

impl Default for CertOptions {
    /// Returns 825 days of validity starting now.
    fn default() -> Self {
        Self {
            days: 825,
            not_before_offset_days: 0,
        }
    }
}

/// Creates `ca.pem` and `ca-key.pem` in `dir`.
///
/// The directory is created with mode 0700 if it is missing and the key is written with
/// mode 0600. Existing files are only replaced when `force` is set.
pub fn create_ca(dir: &Path, opts: &CertOptions, force: bool) -> Result<()> {
    ensure_dir(dir)?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_overwrite(&[&cert_path, &key_path], force)?;
    let mut params = ca_params();
    set_validity(&mut params, opts)?;
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let cert = params.self_signed(&key).context("cannot sign the CA certificate")?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, force)
}

/// Signs `node-<id>.pem` and `node-<id>-key.pem` with the CA in `dir`.
///
/// The certificate carries `keel://node/<id>`, the EKUs serverAuth and clientAuth, and
/// DNS or IP SANs for "localhost", "127.0.0.1" and every entry of `hosts` (an entry that
/// parses as an IP address becomes an IP SAN). Returns the certificate and key paths.
pub fn create_node(
    dir: &Path,
    id: u64,
    hosts: &[String],
    opts: &CertOptions,
    force: bool,
) -> Result<(PathBuf, PathBuf)> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    names.extend(hosts.iter().cloned());
    let mut sans = vec![uri_san(&format!("keel://node/{id}"))?];
    for host in &names {
        let san = host_san(host)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let ekus = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    create_leaf(dir, &format!("node-{id}"), sans, ekus, opts, force)
}

/// Signs `client-<name>.pem` and `client-<name>-key.pem`, or `admin-<name>.pem` and
/// `admin-<name>-key.pem` when `admin` is set, with the CA in `dir`.
///
/// The certificate carries `keel://client/<name>` or `keel://admin/<name>` and the EKU
/// clientAuth only. Returns the certificate and key paths.
pub fn create_client(
    dir: &Path,
    name: &str,
    admin: bool,
    opts: &CertOptions,
    force: bool,
) -> Result<(PathBuf, PathBuf)> {
    validate_name(name)?;
    let role = if admin { "admin" } else { "client" };
    let sans = vec![uri_san(&format!("keel://{role}/{name}"))?];
    let ekus = vec![ExtendedKeyUsagePurpose::ClientAuth];
    create_leaf(dir, &format!("{role}-{name}"), sans, ekus, opts, force)
}

/// Creates the material of a local dev cluster in `dir`: the CA, nodes `nodes`, client
/// "dev" and admin "dev".
///
/// It is idempotent, so a restarted dev cluster keeps its certificates: a pair that
/// already exists is kept as long as it is complete, matches its key, was signed by the
/// current CA and stays valid for another day; anything else is (re)created. An expired
/// CA is replaced, and then every other certificate with it.
pub fn create_dev_set(dir: &Path, nodes: &[u64]) -> Result<()> {
    ensure_dir(dir)?;
    let opts = CertOptions::default();
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let fresh_ca = match (ca_cert.exists(), ca_key.exists()) {
        (false, false) => true,
        (true, true) => !load_ca(dir)?.valid_for(Duration::days(1)),
        _ => bail!(
            "{} holds only one of {CA_CERT} and {CA_KEY}; remove the other one too to start over",
            dir.display()
        ),
    };
    if fresh_ca {
        create_ca(dir, &opts, true)?;
    }
    let ca = load_ca(dir)?;
    let keep = |stem: &str| !fresh_ca && pair_is_usable(dir, stem, &ca);
    for &id in nodes {
        if !keep(&format!("node-{id}")) {
            create_node(dir, id, &[], &opts, true)?;
        }
    }
    for admin in [false, true] {
        if !keep(if admin { "admin-dev" } else { "client-dev" }) {
            create_client(dir, "dev", admin, &opts, true)?;
        }
    }
    Ok(())
}

/// Checks a client or admin name: 1 to 64 characters of `[A-Za-z0-9._-]`.
///
/// Names made only of dots, and names ending in "-key" (whose certificate file would look
/// like another name's key file), are refused as well.
fn validate_name(name: &str) -> Result<()> {
    ensure!(!name.is_empty(), "the name must not be empty");
    ensure!(
        name.len() <= 64,
        "name {name:?} is {} characters long; at most 64 are allowed",
        name.len()
    );
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        bail!("name {name:?} contains {c:?}; only letters, digits, '.', '_' and '-' are allowed");
    }
    ensure!(
        !name.chars().all(|c| c == '.'),
        "name {name:?} must not consist only of dots"
    );
    ensure!(
        !name.ends_with("-key"),
        "name {name:?} must not end in \"-key\": its certificate would look like a key file"
    );
    Ok(())
}

fn uri_san(uri: &str) -> Result<SanType> {
    Ok(SanType::URI(
        uri.try_into().with_context(|| format!("invalid URI {uri:?}"))?,
    ))
}

fn host_san(host: &str) -> Result<SanType> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    rustls::pki_types::DnsName::try_from(host)
        .map_err(|_| anyhow!("host {host:?} is neither an IP address nor a valid DNS name"))?;
    Ok(SanType::DnsName(host.to_ascii_lowercase().try_into()?))
}

/// The parameters of every keel CA; the subject must never change, see [`load_ca`].
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn set_validity(params: &mut CertificateParams, opts: &CertOptions) -> Result<()> {
    let days = i64::from(opts.days);
    ensure!(
        (1..=MAX_DAYS).contains(&days),
        "days must be between 1 and {MAX_DAYS}, not {days}"
    );
    let offset = opts.not_before_offset_days;
    ensure!(
        (-MAX_DAYS..=MAX_DAYS).contains(&offset),
        "the start offset must be within {MAX_DAYS} days"
    );
    let start = OffsetDateTime::now_utc() + Duration::days(offset);
    params.not_before = start - CLOCK_SKEW;
    params.not_after = start + Duration::days(days);
    Ok(())
}

/// The cluster CA loaded from its files, ready to sign.
struct LoadedCa {
    issuer: rcgen::Certificate,
    key: KeyPair,
    key_id: Vec<u8>,
    not_after: i64,
}

impl LoadedCa {
    fn valid_for(&self, margin: Duration) -> bool {
        OffsetDateTime::now_utc().unix_timestamp() + margin.whole_seconds() < self.not_after
    }
}

/// Loads `ca.pem` and `ca-key.pem` from `dir`.
///
/// rcgen signs with an issuer `Certificate`, so the issuer is rebuilt from [`ca_params`]
/// and the key. Its subject must equal the one in `ca.pem` byte for byte (that is what
/// chain building matches on), the key must be the certificate's, and the leaves' AKI
/// takes the SKI found in `ca.pem`.
fn load_ca(dir: &Path) -> Result<LoadedCa> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let hint = "create one with `keel cert ca`";
    let cert_pem = fs::read(&cert_path)
        .with_context(|| format!("cannot read the CA certificate {} ({hint})", cert_path.display()))?;
    let key_pem = fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read the CA key {} ({hint})", key_path.display()))?;
    let key =
        KeyPair::from_pem(&key_pem).with_context(|| format!("{} holds no usable private key", key_path.display()))?;
    let der = first_cert(&cert_pem).with_context(|| format!("in {}", cert_path.display()))?;
    let ca = parse(&der).with_context(|| format!("in {}", cert_path.display()))?;
    ensure!(ca.is_ca(), "{} is not a CA certificate", cert_path.display());
    ensure!(
        ca.public_key().raw == key.public_key_der().as_slice(),
        "{} does not belong to the CA certificate {}",
        key_path.display(),
        cert_path.display()
    );
    let mut params = ca_params();
    let rebuilt = params.clone().self_signed(&key)?;
    ensure!(
        parse(rebuilt.der())?.subject().as_raw() == ca.subject().as_raw(),
        "{} was not created by keel (its subject is {:?}, not {CA_COMMON_NAME:?}); \
         keel can only sign with a CA it created",
        cert_path.display(),
        ca.subject().to_string()
    );
    let key_id = ca
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .unwrap_or_else(|| rebuilt.key_identifier());
    params.key_identifier_method = KeyIdMethod::PreSpecified(key_id.clone());
    let issuer = params.self_signed(&key)?;
    let not_after = ca.validity().not_after.timestamp();
    Ok(LoadedCa {
        issuer,
        key,
        key_id,
        not_after,
    })
}

fn first_cert(pem: &[u8]) -> Result<Vec<u8>> {
    let cert = rustls_pemfile::certs(&mut &pem[..])
        .next()
        .context("no CERTIFICATE block")?;
    Ok(cert.context("malformed PEM")?.to_vec())
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| anyhow!("cannot parse the certificate: {e}"))?;
    Ok(cert)
}

fn create_leaf(
    dir: &Path,
    stem: &str,
    sans: Vec<SanType>,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    opts: &CertOptions,
    force: bool,
) -> Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
    refuse_overwrite(&[&cert_path, &key_path], force)?;
    let ca = load_ca(dir)?;
    ensure!(
        ca.valid_for(Duration::ZERO),
        "the CA in {} has expired; create a new one with `keel cert ca --force` and re-issue \
         every certificate",
        dir.join(CA_CERT).display()
    );
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name.push(DnType::CommonName, stem);
    params.subject_alt_names = sans;
    params.extended_key_usages = ekus;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, opts)?;
    let key = KeyPair::generate().context("cannot generate a key")?;
    let cert = params
        .signed_by(&key, &ca.issuer, &ca.key)
        .with_context(|| format!("cannot sign {}", cert_path.display()))?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, force)?;
    Ok((cert_path, key_path))
}

/// Whether `<stem>.pem` and `<stem>-key.pem` exist, match, were signed by `ca` and stay
/// valid for at least another day.
fn pair_is_usable(dir: &Path, stem: &str, ca: &LoadedCa) -> bool {
    let check = || -> Result<bool> {
        let der = first_cert(&fs::read(dir.join(format!("{stem}.pem")))?)?;
        let key = KeyPair::from_pem(&fs::read_to_string(dir.join(format!("{stem}-key.pem")))?)?;
        let cert = parse(&der)?;
        let signed_by_ca = cert.extensions().iter().any(|ext| {
            matches!(ext.parsed_extension(), ParsedExtension::AuthorityKeyIdentifier(aki)
                if aki.key_identifier.as_ref().is_some_and(|id| id.0 == ca.key_id.as_slice()))
        });
        let expires = cert.validity().not_after.timestamp();
        let fresh = OffsetDateTime::now_utc().unix_timestamp() + 86_400 < expires;
        Ok(signed_by_ca && fresh && cert.public_key().raw == key.public_key_der().as_slice())
    };
    check().unwrap_or(false)
}

fn ensure_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    Ok(())
}

fn refuse_overwrite(paths: &[&Path], force: bool) -> Result<()> {
    if let Some(path) = paths.iter().find(|p| !force && p.exists()) {
        bail!(
            "{} already exists; refusing to overwrite it (use --force to replace it)",
            path.display()
        );
    }
    Ok(())
}

/// Writes `contents` to `path` atomically: a temporary file created with `mode` in the same
/// directory, fsync, then rename (with `force`) or a hard link that fails if `path` exists.
fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("a file path has no file name")?
        .to_string_lossy();
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        match force {
            true => fs::rename(&tmp, path),
            false => match fs::hard_link(&tmp, path) {
                // A file system without hard links: check, then rename.
                Err(e) if e.kind() != ErrorKind::AlreadyExists && !path.exists() => fs::rename(&tmp, path),
                linked => linked,
            },
        }
    })();
    let _ = fs::remove_file(&tmp);
    match result {
        Err(e) if e.kind() == ErrorKind::AlreadyExists && !force && path.exists() => refuse_overwrite(&[path], false)?,
        result => result.with_context(|| format!("cannot write {}", path.display()))?,
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use rustls::client::{WebPkiServerVerifier, danger::ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Every file in `dir` with its contents.
    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        let files = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path());
        files
            .map(|p| (p.file_name().unwrap().to_string_lossy().into(), fs::read(&p).unwrap()))
            .collect()
    }

    fn der(path: &Path) -> CertificateDer<'static> {
        first_cert(&fs::read(path).unwrap()).unwrap().into()
    }

    /// Verifies `cert` as a server certificate for `host` against the CA in `dir`.
    fn verify_server(dir: &Path, cert: &Path, host: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&dir.join(CA_CERT))).unwrap();
        let provider = rustls::crypto::ring::default_provider().into();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
        let name = ServerName::try_from(host.to_owned()).unwrap();
        verifier
            .verify_server_cert(&der(cert), &[], &name, &[], UnixTime::now())
            .map(drop)
    }

    /// The SANs and the (serverAuth, clientAuth) EKU bits of a certificate file.
    fn sans_and_ekus(path: &Path) -> (Vec<String>, (bool, bool)) {
        let der = der(path);
        let cert = parse(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        (
            san.general_names.iter().map(|n| n.to_string()).collect(),
            (eku.server_auth, eku.client_auth),
        )
    }

    #[test]
    fn ca_and_leaves_get_the_right_modes_sans_ekus_and_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new").join("certs");
        let opts = CertOptions::default();
        create_ca(&dir, &opts, false).unwrap();
        assert_eq!((mode(&dir), mode(&dir.join(CA_KEY))), (0o700, 0o600));
        assert_eq!(mode(&dir.join(CA_CERT)) & 0o600, 0o600);
        let hosts = ["db-1.example.com", "10.1.2.3", "LOCALHOST"].map(String::from);
        let (cert, key) = create_node(&dir, 3, &hosts, &opts, false).unwrap();
        assert_eq!(
            (cert.clone(), key.clone()),
            (dir.join("node-3.pem"), dir.join("node-3-key.pem"))
        );
        assert_eq!(mode(&key), 0o600);
        let sans = ["URI(keel://node/3)", "DNSName(localhost)", "IPAddress(7f:00:00:01)"];
        let sans = sans
            .into_iter()
            .chain(["DNSName(db-1.example.com)", "IPAddress(0a:01:02:03)"]);
        assert_eq!(sans_and_ekus(&cert), (sans.map(String::from).collect(), (true, true)));
        for host in ["localhost", "127.0.0.1", "db-1.example.com", "10.1.2.3"] {
            verify_server(&dir, &cert, host).unwrap();
        }
        assert!(verify_server(&dir, &cert, "other.example.com").is_err());
        let (client, client_key) = create_client(&dir, "gw-1", false, &opts, false).unwrap();
        assert_eq!(
            (client.clone(), client_key),
            (dir.join("client-gw-1.pem"), dir.join("client-gw-1-key.pem"))
        );
        let (admin, _) = create_client(&dir, "ops", true, &opts, false).unwrap();
        assert_eq!(admin, dir.join("admin-ops.pem"));
        assert_eq!(
            sans_and_ekus(&client),
            (vec!["URI(keel://client/gw-1)".into()], (false, true))
        );
        assert_eq!(
            sans_and_ekus(&admin),
            (vec!["URI(keel://admin/ops)".into()], (false, true))
        );
        // No serverAuth EKU: a client certificate cannot pose as a server.
        let err = verify_server(&dir, &client, "localhost").unwrap_err();
        assert!(format!("{err:?}").contains("InvalidPurpose"), "{err:?}");
        assert!(snapshot(&dir).keys().all(|name| !name.ends_with(".tmp")));
    }

    #[test]
    fn overwrite_is_refused_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, opts) = (tmp.path(), CertOptions::default());
        create_ca(dir, &opts, false).unwrap();
        create_node(dir, 1, &[], &opts, false).unwrap();
        create_client(dir, "dev", true, &opts, false).unwrap();
        let before = snapshot(dir);
        let err = create_ca(dir, &opts, false).unwrap_err().to_string();
        assert!(err.contains("ca.pem already exists; refusing to overwrite"), "{err}");
        let err = create_node(dir, 1, &[], &opts, false).unwrap_err().to_string();
        assert!(err.contains("node-1.pem already exists"), "{err}");
        // Half a pair is enough to refuse, and nothing is written.
        fs::remove_file(dir.join("admin-dev.pem")).unwrap();
        let err = create_client(dir, "dev", true, &opts, false).unwrap_err().to_string();
        assert!(err.contains("admin-dev-key.pem already exists"), "{err}");
        fs::write(dir.join("admin-dev.pem"), &before["admin-dev.pem"]).unwrap();
        // The final no-clobber link holds even if the file appears after the first check.
        let err = write_file(&dir.join("node-1.pem"), b"x", 0o644, false).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(snapshot(dir), before);
        let (_, key) = create_node(dir, 1, &[], &opts, true).unwrap();
        assert_ne!(fs::read(key).unwrap(), before["node-1-key.pem"]);
        create_ca(dir, &opts, true).unwrap();
        assert_ne!(fs::read(dir.join(CA_KEY)).unwrap(), before[CA_KEY]);
        assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
    }

    #[test]
    fn ca_is_loaded_back_from_disk_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, opts) = (tmp.path(), CertOptions::default());
        let err = format!("{:#}", create_node(dir, 1, &[], &opts, false).unwrap_err());
        assert!(err.contains("ca.pem") && err.contains("keel cert ca"), "{err}");
        create_ca(dir, &opts, false).unwrap();
        // Every call loads the CA from its files, as a later process would.
        let (cert, _) = create_node(dir, 2, &[], &opts, false).unwrap();
        verify_server(dir, &cert, "localhost").unwrap();
        let ca = load_ca(dir).unwrap();
        assert!(pair_is_usable(dir, "node-2", &ca));
        let der = der(&dir.join(CA_CERT));
        let ski = parse(&der)
            .unwrap()
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            });
        assert_eq!(ski, Some(ca.key_id));
        // A key that is not the CA's, and a CA with a foreign subject, are refused.
        fs::write(dir.join(CA_KEY), KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let err = create_node(dir, 3, &[], &opts, false).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
        let key = KeyPair::generate().unwrap();
        let mut foreign = CertificateParams::default();
        foreign.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        fs::write(dir.join(CA_CERT), foreign.self_signed(&key).unwrap().pem()).unwrap();
        fs::write(dir.join(CA_KEY), key.serialize_pem()).unwrap();
        let err = create_node(dir, 3, &[], &opts, false).unwrap_err().to_string();
        assert!(err.contains("was not created by keel"), "{err}");
    }

    #[test]
    fn validity_follows_the_options() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        create_ca(dir, &CertOptions::default(), false).unwrap();
        let expired = CertOptions {
            days: 2,
            not_before_offset_days: -10,
        };
        let (cert, _) = create_node(dir, 1, &[], &expired, false).unwrap();
        let err = verify_server(dir, &cert, "localhost").unwrap_err();
        assert!(format!("{err:?}").contains("Expired"), "{err:?}");
        let der = der(&cert);
        let validity = parse(&der).unwrap().validity().clone();
        let span = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(span, 2 * 86_400 + CLOCK_SKEW.whole_seconds());
        for (days, offset) in [(0, 0), (40_000, 0), (1, i64::MIN)] {
            let opts = CertOptions {
                days,
                not_before_offset_days: offset,
            };
            let err = create_node(dir, 2, &[], &opts, false).unwrap_err().to_string();
            assert!(err.contains("days must be between") || err.contains("within"), "{err}");
        }
        let old = tempfile::tempdir().unwrap();
        create_ca(old.path(), &expired, false).unwrap();
        let err = create_node(old.path(), 1, &[], &CertOptions::default(), false).unwrap_err();
        assert!(err.to_string().contains("has expired"), "{err}");
    }

    #[test]
    fn bad_names_and_hosts_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, opts) = (tmp.path(), CertOptions::default());
        create_ca(dir, &opts, false).unwrap();
        let long = "a".repeat(65);
        for (name, why) in [
            ("", "must not be empty"),
            (long.as_str(), "at most 64"),
            ("a/b", "contains '/'"),
            ("../x", "contains '/'"),
            ("gw 1", "contains ' '"),
            ("ünï", "contains 'ü'"),
            ("..", "only of dots"),
            ("gw-key", "-key"),
        ] {
            let err = create_client(dir, name, false, &opts, false).unwrap_err().to_string();
            assert!(err.contains(why), "{name:?}: {err}");
        }
        create_client(dir, &"a".repeat(64), false, &opts, false).unwrap();
        create_client(dir, "A.b_c-9", true, &opts, false).unwrap();
        for host in ["", "bad host", "a..b", "*.*", "x/y"] {
            let err = create_node(dir, 1, &[host.into()], &opts, false)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("neither an IP address nor a valid DNS name"),
                "{host:?}: {err}"
            );
        }
        assert!(!dir.join("node-1.pem").exists());
        create_node(dir, 1, &["::1".into(), "Node-1.Example".into()], &opts, false).unwrap();
    }

    #[test]
    fn dev_set_is_idempotent_and_heals() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        create_dev_set(&dir, &[1, 2, 3]).unwrap();
        let first = snapshot(&dir);
        let stems = ["ca", "node-1", "node-2", "node-3", "client-dev", "admin-dev"];
        let mut want: Vec<_> = stems
            .iter()
            .flat_map(|s| [format!("{s}.pem"), format!("{s}-key.pem")])
            .collect();
        want.sort();
        assert_eq!(first.keys().cloned().collect::<Vec<_>>(), want);
        assert_eq!(mode(&dir), 0o700);
        assert!(
            want.iter()
                .filter(|n| n.ends_with("-key.pem"))
                .all(|n| mode(&dir.join(n)) == 0o600)
        );
        create_dev_set(&dir, &[1, 2, 3]).unwrap();
        assert_eq!(snapshot(&dir), first);
        // A lost half of a pair is re-issued, a new node is added; everything else stays.
        fs::remove_file(dir.join("node-2.pem")).unwrap();
        create_dev_set(&dir, &[1, 2, 3, 4]).unwrap();
        let second = snapshot(&dir);
        assert_ne!(second["node-2-key.pem"], first["node-2-key.pem"]);
        assert!(second.contains_key("node-4.pem"));
        for name in [
            "ca.pem",
            "node-1.pem",
            "node-3-key.pem",
            "client-dev.pem",
            "admin-dev.pem",
        ] {
            assert_eq!(second[name], first[name], "{name} changed");
        }
        // A new CA makes every leaf stale, so all of them are re-issued.
        create_ca(&dir, &CertOptions::default(), true).unwrap();
        create_dev_set(&dir, &[1]).unwrap();
        verify_server(&dir, &dir.join("node-1.pem"), "127.0.0.1").unwrap();
        assert_ne!(fs::read(dir.join("client-dev.pem")).unwrap(), second["client-dev.pem"]);
        // Half a CA is an error, not a silent new CA.
        fs::remove_file(dir.join(CA_KEY)).unwrap();
        let err = create_dev_set(&dir, &[1]).unwrap_err().to_string();
        assert!(err.contains("holds only one of ca.pem and ca-key.pem"), "{err}");
    }
}
