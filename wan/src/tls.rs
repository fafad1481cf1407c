//! Mutual TLS for the replication link.
//!
//! `keygen` writes, into one directory: `ca.pem`/`ca.key` (the deployment's
//! own certificate authority), `backup.pem`/`backup.key` (server, names
//! `remus-backup` and `localhost`) and `primary.pem`/`primary.key` (a
//! client certificate shared by every guest, named `remus-primary`). Each
//! side trusts only certificates signed by that CA; a peer without one is
//! refused during the handshake.
//!
//! Per-guest identity: [`issue_guest`] signs `guest-G.pem`/`guest-G.key`,
//! a client certificate named `guest-G.remus` ([`guest_name`]) that speaks
//! for guest G alone, valid for a number of days, its serial recorded in
//! `issued.txt` beside the CA. [`revoke_guest`] revokes every certificate
//! issued for a guest and writes `revoked.crl`, which a backup loads
//! beside its CA ([`TlsDir::crls`]) and checks at every handshake.
//! [`speaks_for`] says which guests a client certificate may speak for.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use remus_types::GuestId;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};

use crate::error::LinkError;

/// Name the backup's certificate is issued for; primaries connect with it.
pub const SERVER_NAME: &str = "remus-backup";
/// Name of the client certificate `keygen` writes, shared by every guest.
pub const SHARED_PRIMARY_NAME: &str = "remus-primary";

/// The name a certificate that speaks for `guest` alone is issued for.
#[must_use]
pub fn guest_name(guest: GuestId) -> String {
    format!("guest-{}.remus", guest.0)
}

/// Whom a client certificate may speak for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// The guest it names.
    Guest,
    /// Any guest: the certificate shared by every primary.
    Shared,
    /// Not this guest.
    Not,
}

/// Whether the client certificate `leaf` (already verified against the
/// CA by the handshake) may speak for `guest`.
#[must_use]
pub fn speaks_for(leaf: &CertificateDer<'_>, guest: GuestId) -> Speaks {
    if issued_for(leaf, &guest_name(guest)) {
        Speaks::Guest
    } else if issued_for(leaf, SHARED_PRIMARY_NAME) {
        Speaks::Shared
    } else {
        Speaks::Not
    }
}

/// Whether the certificate `leaf` (already verified against the CA) is a
/// backup's (issued for [`SERVER_NAME`]).
#[must_use]
pub fn is_backup(leaf: &CertificateDer<'_>) -> bool {
    issued_for(leaf, SERVER_NAME)
}

/// The certificate chain the peer of `conn` presented (leaf first; empty
/// without one).
#[must_use]
pub fn peer_chain(conn: &quinn::Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity().and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok()).map(|c| *c).unwrap_or_default()
}

/// Whether `leaf` is issued for `name`, by webpki's own name check.
fn issued_for(leaf: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else { return false };
    ServerName::try_from(name.to_string()).is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
}

/// ALPN protocol id of the replication link.
pub const ALPN: &[u8] = b"remus/1";

/// A certificate chain and its private key.
pub struct Identity {
    /// Leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

/// Where the TLS files of a data directory live.
#[derive(Debug, Clone)]
pub struct TlsDir(pub PathBuf);

impl TlsDir {
    /// The CA certificate.
    #[must_use]
    pub fn ca(&self) -> PathBuf {
        self.0.join("ca.pem")
    }

    /// The revocation list, when there is one.
    #[must_use]
    pub fn crl(&self) -> PathBuf {
        self.0.join("revoked.crl")
    }

    /// Certificate and key of `role` (`backup`, `primary`, or `guest-G`).
    #[must_use]
    pub fn pair(&self, role: &str) -> (PathBuf, PathBuf) {
        (self.0.join(format!("{role}.pem")), self.0.join(format!("{role}.key")))
    }

    /// True when every file `keygen` writes exists.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        let (a, b) = self.pair("backup");
        let (c, d) = self.pair("primary");
        [self.ca(), a, b, c, d].iter().all(|p| p.exists())
    }

    /// The files missing for `role` (`backup`, or the primary of a guest:
    /// its own pair or the shared one), CA certificate included.
    #[must_use]
    pub fn missing_for(&self, guest: Option<GuestId>) -> Vec<PathBuf> {
        let pair = match guest {
            None => self.pair("backup"),
            Some(g) => {
                let own = self.pair(&format!("guest-{}", g.0));
                if own.0.exists() {
                    own
                } else {
                    self.pair("primary")
                }
            }
        };
        [self.ca(), pair.0, pair.1].into_iter().filter(|p| !p.exists()).collect()
    }

    /// Loads the identity of `role`.
    ///
    /// # Errors
    /// [`LinkError::Tls`] naming the unreadable or invalid file.
    pub fn identity(&self, role: &str) -> Result<Identity, LinkError> {
        let (cert, key) = self.pair(role);
        Ok(Identity { certs: read_certs(&cert)?, key: read_key(&key)? })
    }

    /// The identity a primary of `guest` presents: its own certificate
    /// (`guest-G.pem`) when there is one, else the shared `primary.pem`.
    ///
    /// # Errors
    /// As [`identity`](Self::identity).
    pub fn primary_identity(&self, guest: GuestId) -> Result<Identity, LinkError> {
        let own = format!("guest-{}", guest.0);
        self.identity(if self.pair(&own).0.exists() { &own } else { "primary" })
    }

    /// The backup's QUIC server configuration from this directory: its
    /// identity, the CA, and the revocation list when there is one.
    ///
    /// # Errors
    /// [`LinkError::Tls`] naming an unreadable or invalid file.
    pub fn backup_server(&self) -> Result<quinn::ServerConfig, LinkError> {
        server_config(self.identity("backup")?, self.roots()?, self.crls()?)
    }

    /// As [`backup_server`](Self::backup_server), with the [`PeerCheck`]
    /// of connected primaries made by the same verifier (the files read
    /// once).
    ///
    /// # Errors
    /// As [`backup_server`](Self::backup_server).
    pub fn backup_server_and_check(&self) -> Result<(quinn::ServerConfig, PeerCheck), LinkError> {
        let verifier = client_verifier(self.roots()?, self.crls()?)?;
        Ok((server_config_with(self.identity("backup")?, Arc::clone(&verifier))?, peer_check(verifier)))
    }

    /// The revocation lists to check the peer's certificate against (none
    /// when `revoked.crl` is absent): a backup checks primaries by it, a
    /// primary its backup.
    ///
    /// # Errors
    /// [`LinkError::Tls`] naming an unreadable or invalid file.
    pub fn crls(&self) -> Result<Vec<CertificateRevocationListDer<'static>>, LinkError> {
        let path = self.crl();
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(LinkError::Tls(format!("{}: {e}", path.display()))),
        };
        let crls = rustls_pemfile::crls(&mut data.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
        if crls.is_empty() {
            return Err(LinkError::Tls(format!("{}: no revocation list found", path.display())));
        }
        Ok(crls)
    }

    /// Loads the CA as a root store.
    ///
    /// # Errors
    /// [`LinkError::Tls`] naming the unreadable or invalid file.
    pub fn roots(&self) -> Result<rustls::RootCertStore, LinkError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(&self.ca())? {
            roots.add(c).map_err(|e| LinkError::Tls(format!("{}: {e}", self.ca().display())))?;
        }
        Ok(roots)
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    let data = fs::read(path).map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(LinkError::Tls(format!("{}: no certificate found", path.display())));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, LinkError> {
    let data = fs::read(path).map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?
        .ok_or_else(|| LinkError::Tls(format!("{}: no private key found", path.display())))
}

/// Writes a fresh CA and backup/primary certificates into `dir`.
///
/// # Errors
/// [`LinkError::Tls`] when generation fails, [`LinkError::Io`] when the
/// files cannot be written.
pub fn keygen(dir: &Path) -> Result<(), LinkError> {
    let tls = |e: rcgen::Error| LinkError::Tls(e.to_string());
    fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate().map_err(tls)?;
    let ca_cert = ca_params()?.self_signed(&ca_key).map_err(tls)?;
    let td = TlsDir(dir.to_path_buf());
    write_private(&td.0.join("ca.key"), &ca_key.serialize_pem())?;
    fs::write(td.ca(), ca_cert.pem())?;
    for (role, names, usage) in [
        // A backup is also a client: of a remus witness.
        (
            "backup",
            vec![SERVER_NAME.to_string(), "localhost".to_string()],
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        ),
        ("primary", vec!["remus-primary".to_string()], vec![ExtendedKeyUsagePurpose::ClientAuth]),
    ] {
        let mut p = CertificateParams::new(names).map_err(tls)?;
        p.distinguished_name.push(DnType::CommonName, format!("remus {role}"));
        p.extended_key_usages = usage;
        let key = KeyPair::generate().map_err(tls)?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(tls)?;
        let (c, k) = td.pair(role);
        write_private(&k, &key.serialize_pem())?;
        fs::write(c, cert.pem())?;
    }
    Ok(())
}

/// The CA's certificate parameters: the same every time, so that the CA
/// key alone re-creates an issuer that certificates and revocation lists
/// chain to (its subject and key identifier).
fn ca_params() -> Result<CertificateParams, LinkError> {
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| LinkError::Tls(e.to_string()))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "remus CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.key_identifier_method = KeyIdMethod::Sha256;
    Ok(ca)
}

/// The CA of `ca_dir` as an issuer: its certificate re-created from its key.
fn issuer(ca_dir: &Path) -> Result<(rcgen::Certificate, KeyPair), LinkError> {
    let path = ca_dir.join("ca.key");
    let pem = fs::read_to_string(&path)
        .map_err(|e| LinkError::Tls(format!("{}: {e} (the CA key is needed to issue or revoke)", path.display())))?;
    let key = KeyPair::from_pem(&pem).map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))?;
    let cert = ca_params()?.self_signed(&key).map_err(|e| LinkError::Tls(e.to_string()))?;
    Ok((cert, key))
}

/// A certificate issued by [`issue_guest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The guest it speaks for.
    pub guest: GuestId,
    /// Its serial number, hex.
    pub serial: String,
    /// When it expires (Unix seconds).
    pub not_after_unix: i64,
}

/// Every certificate the CA in `ca_dir` issued (`issued.txt`).
///
/// # Errors
/// [`LinkError::Tls`] naming an unreadable or malformed file.
pub fn issued(ca_dir: &Path) -> Result<Vec<Issued>, LinkError> {
    let path = ca_dir.join("issued.txt");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LinkError::Tls(format!("{}: {e}", path.display()))),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let parse = || {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f[..] {
                    [g, serial, until] => {
                        Some(Issued { guest: GuestId(g.parse().ok()?), serial: serial.to_string(), not_after_unix: until.parse().ok()? })
                    }
                    _ => None,
                }
            };
            parse().ok_or_else(|| LinkError::Tls(format!("{}: malformed line {l:?}", path.display())))
        })
        .collect()
}

/// Issues a certificate that speaks for `guest` alone, valid from an hour
/// ago (clock skew) for `days` days (0: already expired, for tests of
/// expiry), signed by the CA in `ca_dir`; writes `guest-G.pem` and
/// `guest-G.key` into `out` and records the serial in `issued.txt`.
///
/// # Errors
/// [`LinkError::Tls`] without the CA key; [`LinkError::Io`] when a file
/// cannot be written.
pub fn issue_guest(ca_dir: &Path, guest: GuestId, days: u32, out: &Path) -> Result<Issued, LinkError> {
    let tls = |e: rcgen::Error| LinkError::Tls(e.to_string());
    let (ca_cert, ca_key) = issuer(ca_dir)?;
    let now = time::OffsetDateTime::now_utc();
    let mut p = CertificateParams::new(vec![guest_name(guest)]).map_err(tls)?;
    p.distinguished_name.push(DnType::CommonName, format!("remus guest {}", guest.0));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = now - time::Duration::hours(1);
    p.not_after = if days == 0 { now - time::Duration::minutes(1) } else { now + time::Duration::days(i64::from(days)) };
    // Unique per issue: the guest, the time and this process.
    let mut h = blake3::Hasher::new();
    h.update(&guest.0.to_le_bytes());
    h.update(&now.unix_timestamp_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let mut serial = h.finalize().as_bytes()[..16].to_vec();
    // Positive, and no leading zero byte: DER drops it, and the serial
    // read back from the certificate would then differ from the one
    // recorded in issued.txt (one issue in 128 before).
    serial[0] = serial[0] & 0x7f | 0x40;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    let not_after_unix = p.not_after.unix_timestamp();
    let key = KeyPair::generate().map_err(tls)?;
    let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(tls)?;
    fs::create_dir_all(out)?;
    let dir = TlsDir(out.to_path_buf());
    let (c, k) = dir.pair(&format!("guest-{}", guest.0));
    write_private(&k, &key.serialize_pem())?;
    fs::write(c, cert.pem())?;
    let issued = Issued { guest, serial: hex(&serial), not_after_unix };
    append_line(&ca_dir.join("issued.txt"), &format!("{} {} {}", guest.0, issued.serial, issued.not_after_unix))?;
    Ok(issued)
}

/// The serials (hex) the CA in `ca_dir` revoked (`revoked.txt`).
///
/// # Errors
/// [`LinkError::Io`] when the file exists and cannot be read.
pub fn revoked(ca_dir: &Path) -> Result<Vec<String>, LinkError> {
    match fs::read_to_string(ca_dir.join("revoked.txt")) {
        Ok(t) => Ok(t.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Revokes every certificate issued for `guest` and writes `revoked.crl`
/// (every serial revoked so far, signed by the CA) into `ca_dir`; returns
/// the serials newly revoked. Copy the list to each backup's TLS
/// directory; a backup reads it when it starts and when it changes.
///
/// # Errors
/// [`LinkError::Tls`] without the CA key or when no certificate was
/// issued for `guest`; [`LinkError::Io`].
pub fn revoke_guest(ca_dir: &Path, guest: GuestId) -> Result<Vec<String>, LinkError> {
    let serials: Vec<String> = issued(ca_dir)?.into_iter().filter(|i| i.guest == guest).map(|i| i.serial).collect();
    if serials.is_empty() {
        return Err(LinkError::Tls(format!("no certificate was issued for {guest} by the CA in {}", ca_dir.display())));
    }
    revoke_serials(ca_dir, serials)
}

/// Revokes the certificate with serial `serial` (hex, as `remus cert
/// list` and [`serial_of`] give it), whatever it is for: a backup's, say,
/// which primaries holding the list then refuse. Returns the serials
/// newly revoked (none when it already was).
///
/// # Errors
/// As [`revoke_guest`]; [`LinkError::Tls`] for a serial that is not hex.
pub fn revoke_serial(ca_dir: &Path, serial: &str) -> Result<Vec<String>, LinkError> {
    let serial = serial.trim().trim_start_matches("0x").to_ascii_lowercase();
    if serial.is_empty() || unhex(&serial).is_none() {
        return Err(LinkError::Tls(format!("serial {serial:?} is not hex digits")));
    }
    revoke_serials(ca_dir, vec![serial])
}

/// The serial number (hex) of the first certificate in the PEM file at
/// `path`.
///
/// # Errors
/// [`LinkError::Tls`] for an unreadable file or certificate.
pub fn serial_of(path: &Path) -> Result<String, LinkError> {
    let cert = read_certs(path)?.into_iter().next().ok_or_else(|| LinkError::Tls(format!("{}: no certificate", path.display())))?;
    der_serial(&cert).map(hex).ok_or_else(|| LinkError::Tls(format!("{}: not an X.509 certificate", path.display())))
}

/// The serial of a DER certificate: `Certificate ::= SEQUENCE {
/// tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber INTEGER,
/// ... } ... }`.
fn der_serial(der: &[u8]) -> Option<&[u8]> {
    // (tag, contents, rest) of the element at the start of `b`.
    fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n].iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x));
            b = &b[n..];
            len
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (0x30, cert, _) = element(der)? else { return None };
    let (0x30, tbs, _) = element(cert)? else { return None };
    let (tag, body, rest) = element(tbs)?;
    let (tag, body) = if tag == 0xa0 { element(rest).map(|(t, b, _)| (t, b))? } else { (tag, body) };
    (tag == 0x02).then_some(body).map(|b| if b.len() > 1 && b[0] == 0 { &b[1..] } else { b })
}

/// Adds `serials` to the CA's revoked ones and rewrites `revoked.crl`.
fn revoke_serials(ca_dir: &Path, serials: Vec<String>) -> Result<Vec<String>, LinkError> {
    let (ca_cert, ca_key) = issuer(ca_dir)?;
    let mut all = revoked(ca_dir)?;
    let new: Vec<String> = serials.into_iter().filter(|s| !all.contains(s)).collect();
    let now = time::OffsetDateTime::now_utc();
    for s in &new {
        append_line(&ca_dir.join("revoked.txt"), &format!("{s} {}", now.unix_timestamp()))?;
        all.push(s.clone());
    }
    let crl = CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(3650),
        crl_number: SerialNumber::from(u64::try_from(now.unix_timestamp()).unwrap_or(0)),
        issuing_distribution_point: None,
        revoked_certs: all
            .iter()
            .filter_map(|s| unhex(s))
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca_cert, &ca_key)
    .map_err(|e| LinkError::Tls(e.to_string()))?;
    fs::write(TlsDir(ca_dir.to_path_buf()).crl(), crl.pem().map_err(|e| LinkError::Tls(e.to_string()))?)?;
    Ok(new)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

fn append_line(path: &Path, line: &str) -> Result<(), LinkError> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{line}")?;
    f.sync_all()?;
    Ok(())
}

fn write_private(path: &Path, pem: &str) -> Result<(), LinkError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC server config for the backup: presents `id`, demands a client
/// certificate signed by a CA in `roots`, unexpired and not revoked by
/// any of `crls`.
///
/// # Errors
/// [`LinkError::Tls`] when the key, certificates or lists are unusable.
pub fn server_config(
    id: Identity,
    roots: rustls::RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<quinn::ServerConfig, LinkError> {
    server_config_with(id, client_verifier(roots, crls)?)
}

/// As [`server_config`], with the client certificate check given.
fn server_config_with(
    id: Identity,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<quinn::ServerConfig, LinkError> {
    let tls = |e: rustls::Error| LinkError::Tls(e.to_string());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.certs, id.key)
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(q));
    sc.transport_config(Arc::new(crate::driver::transport_config(crate::driver::Congestion::default(), None)));
    Ok(sc)
}

/// The check of a client certificate: signed by a CA in `roots`,
/// unexpired, not revoked by any of `crls`.
fn client_verifier(
    roots: rustls::RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, LinkError> {
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| LinkError::Tls(e.to_string()))
}

/// Checks a connected primary's certificate chain (leaf first) again,
/// as a handshake would now: `Err` says why it is no longer valid.
pub type PeerCheck = Arc<dyn Fn(&[CertificateDer<'static>]) -> Result<(), String> + Send + Sync>;

/// The [`PeerCheck`] of `verifier` (the handshake's own).
fn peer_check(verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>) -> PeerCheck {
    Arc::new(move |chain: &[CertificateDer<'static>]| {
        let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
        verifier.verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now()).map(|_| ()).map_err(|e| e.to_string())
    })
}

/// QUIC client config for the primary: trusts a backup certificate from
/// `roots` that none of `crls` revokes, presents `id`
/// (`None` only to test that the backup refuses such a client).
///
/// # Errors
/// [`LinkError::Tls`] when the key or certificates are unusable.
pub fn client_config(
    id: Option<Identity>,
    roots: rustls::RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<quinn::ClientConfig, LinkError> {
    let tls = |e: rustls::Error| LinkError::Tls(e.to_string());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_webpki_verifier(verifier);
    let mut cfg = match id {
        Some(id) => b.with_client_auth_cert(id.certs, id.key).map_err(tls)?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let q = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(q));
    cc.transport_config(Arc::new(crate::driver::transport_config(crate::driver::Congestion::default(), None)));
    Ok(cc)
}
