//! The built-in local CA: an ECDSA P-256 root kept in `<storage>/ca/`, issuing short-lived
//! leaf certificates for local development and the quick start. No network needed.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use crate::cert::CertPair;
use crate::error::{Error, Result, io};
use crate::storage::{create_private_dir, write_private};

/// The CA key under which local-CA certificates are stored.
pub const INTERNAL_CA_KEY: &str = "internal";

/// How long a leaf issued by the local CA lives (renew when a third is left).
pub const LOCAL_LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// The local CA: a root certificate and its key.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    root_path: Option<PathBuf>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("root_path", &self.root_path)
            .finish_non_exhaustive()
    }
}

fn generate_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |source| Error::Generate {
        what: what.to_owned(),
        source,
    }
}

fn root_params() -> Result<CertificateParams> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(generate_err("local CA"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Portunus Local CA");
    dn.push(DnType::OrganizationName, "Portunus");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    Ok(params)
}

impl LocalCa {
    /// A fresh CA kept only in memory.
    pub fn generate() -> Result<Self> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_err("local CA key"))?;
        let params = root_params()?;
        let root = params.self_signed(&key).map_err(generate_err("local CA"))?;
        Ok(Self {
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
            root_path: None,
        })
    }

    /// Loads the CA from `dir` (`<storage>/ca`), creating it once if it is not there:
    /// `root.pem` and `root.key` (0600) in a 0700 directory.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let root_path = dir.join("root.pem");
        let key_path = dir.join("root.key");
        if root_path.exists() && key_path.exists() {
            let root_pem = fs::read_to_string(&root_path).map_err(io(&root_path))?;
            let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(generate_err("local CA key"))?;
            let issuer =
                Issuer::from_ca_cert_pem(&root_pem, key).map_err(generate_err("local CA"))?;
            return Ok(Self {
                issuer,
                root_pem,
                root_path: Some(root_path),
            });
        }
        create_private_dir(dir)?;
        let mut ca = Self::generate()?;
        // The key first: a root.pem without its key is regenerated next time.
        write_private(&key_path, ca.issuer.key().serialize_pem().as_bytes())?;
        write_private(&root_path, ca.root_pem.as_bytes())?;
        ca.root_path = Some(root_path);
        Ok(ca)
    }

    /// The root certificate, PEM: what clients must trust (`curl --cacert`).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Where the root certificate is stored, if on disk.
    pub fn root_path(&self) -> Option<&Path> {
        self.root_path.as_deref()
    }

    /// Issues a leaf certificate for `names` (DNS names, `*.wildcards` or IP addresses)
    /// valid for `lifetime`, with a fresh ECDSA P-256 key. The chain holds the leaf only:
    /// clients trust the root directly.
    pub fn issue(&self, names: &[String], lifetime: Duration) -> Result<CertPair> {
        let what = names.first().map_or("certificate", String::as_str);
        let mut params = CertificateParams::new(names.to_vec()).map_err(generate_err(what))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, what);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after =
            now + time::Duration::try_from(lifetime).unwrap_or(time::Duration::days(7));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_err(what))?;
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(generate_err(what))?;
        Ok(CertPair {
            chain_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_leaves_that_parse() {
        let ca = LocalCa::generate().unwrap();
        let pair = ca
            .issue(
                &["a.test".into(), "*.a.test".into(), "127.0.0.1".into()],
                LOCAL_LEAF_LIFETIME,
            )
            .unwrap();
        let info = pair.info("a.test").unwrap();
        assert_eq!(info.names, ["a.test", "*.a.test", "127.0.0.1"]);
        assert!(info.issuer.contains("Portunus Local CA"), "{}", info.issuer);
        let lifetime = info.lifetime().as_secs();
        assert!(
            (LOCAL_LEAF_LIFETIME.as_secs()..LOCAL_LEAF_LIFETIME.as_secs() + 600)
                .contains(&lifetime)
        );
    }

    #[test]
    fn root_is_created_once_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let first = LocalCa::load_or_create(&ca_dir).unwrap();
        let second = LocalCa::load_or_create(&ca_dir).unwrap();
        assert_eq!(first.root_pem(), second.root_pem());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir), 0o700);
        assert_eq!(mode(&ca_dir.join("root.key")), 0o600);
        assert_eq!(mode(&ca_dir.join("root.pem")), 0o600);
        // A leaf from the reloaded CA names the same issuer.
        let pair = second
            .issue(&["b.test".into()], LOCAL_LEAF_LIFETIME)
            .unwrap();
        assert!(
            pair.info("b.test")
                .unwrap()
                .issuer
                .contains("Portunus Local CA")
        );
    }
}
