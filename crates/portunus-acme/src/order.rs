//! One ACME order for one name: account, challenges, finalization.

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType,
    ExternalAccountKey, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use portunus_store::{BlobKind, CertPair, CertStorage, Challenges, contact_key};
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tracing::{debug, info};

use crate::config::{AcmeConfig, ChallengeKind};
use crate::error::{Error, Result};

const ACCOUNT: &str = "account";

/// Loads the stored account for this CA and contact, or creates (and stores) one; `fresh`
/// creates one even if one is stored.
pub(crate) async fn load_or_create_account(
    config: &AcmeConfig,
    ca_key: &str,
    storage: &dyn CertStorage,
    fresh: bool,
) -> Result<Account> {
    let builder = || {
        match &config.ca_root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        }
        .map_err(|e| Error::acme(ACCOUNT, e))
    };
    let contact = contact_key(config.email.as_deref());
    let stored = if fresh {
        None
    } else {
        storage
            .load_blob(BlobKind::Account, ca_key, &contact)
            .await?
    };
    if let Some(blob) = stored {
        let credentials: AccountCredentials =
            serde_json::from_slice(&blob).map_err(Error::Account)?;
        let account = builder()?
            .from_credentials(credentials)
            .await
            .map_err(|e| Error::acme(ACCOUNT, e))?;
        debug!(ca = %ca_key, "ACME account loaded");
        return Ok(account);
    }
    let mailto = config.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = mailto.iter().map(String::as_str).collect();
    let eab = match &config.eab {
        None => None,
        Some(eab) => {
            use base64::Engine as _;
            let raw = eab.hmac_key.trim().trim_end_matches('=');
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(raw)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(raw))
                .map_err(|_| Error::Config("acme.eab.hmac_key is not base64".to_owned()))?;
            Some(ExternalAccountKey::new(eab.kid.clone(), &key))
        }
    };
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            eab.as_ref(),
        )
        .await
        .map_err(|e| Error::acme(ACCOUNT, e))?;
    let blob = serde_json::to_vec(&credentials).map_err(Error::Account)?;
    storage
        .store_blob(BlobKind::Account, ca_key, &contact, &blob)
        .await?;
    info!(ca = %ca_key, id = %account.id(), "ACME account created");
    Ok(account)
}

/// Removes published challenge answers when the order ends, however it ends.
struct Published {
    challenges: Arc<Challenges>,
    tokens: Vec<String>,
    names: Vec<String>,
}

impl Drop for Published {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.challenges.remove_http01(token);
        }
        for name in &self.names {
            self.challenges.remove_tls_alpn01(name);
        }
    }
}

/// The tls-alpn-01 certificate (RFC 8737): the name, and the key authorization's digest in
/// the critical acmeIdentifier extension.
fn tls_alpn_certificate(
    name: &str,
    digest: &[u8],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>> {
    let generate = |source| Error::Generate {
        name: name.to_owned(),
        source,
    };
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(generate)?;
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let cert = params.self_signed(&key).map_err(generate)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|source| portunus_store::Error::KeyMismatch {
            what: format!("tls-alpn-01 certificate for {name}"),
            source,
        })?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// Orders a certificate for `name`, answering its challenge through `challenges`.
pub(crate) async fn order(
    config: &AcmeConfig,
    account: &Account,
    name: &str,
    replaces: Option<CertificateIdentifier<'static>>,
    challenges: &Arc<Challenges>,
    provider: &CryptoProvider,
) -> Result<CertPair> {
    if name.starts_with("*.") {
        return Err(Error::Wildcard {
            name: name.to_owned(),
        });
    }
    let acme = |e| Error::acme(name, e);
    let identifier = match name.parse::<std::net::IpAddr>() {
        Ok(ip) => Identifier::Ip(ip),
        Err(_) => Identifier::Dns(name.to_owned()),
    };
    let identifiers = [identifier];
    let mut new_order = NewOrder::new(&identifiers);
    if let Some(profile) = &config.profile {
        new_order = new_order.profile(profile);
    }
    if let Some(replaces) = replaces {
        new_order = new_order.replaces(replaces);
    }
    let mut order = account.new_order(&new_order).await.map_err(acme)?;

    let mut published = Published {
        challenges: Arc::clone(challenges),
        tokens: Vec::new(),
        names: Vec::new(),
    };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(acme)?;
        match authorization.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            status => {
                return Err(Error::Invalid {
                    name: name.to_owned(),
                    detail: format!("authorization is {status:?}"),
                });
            }
        }
        let offered: Vec<ChallengeType> = authorization
            .challenges
            .iter()
            .map(|c| c.r#type.clone())
            .collect();
        let Some(kind) = config
            .challenges
            .iter()
            .copied()
            .find(|k| offered.contains(&k.acme()))
        else {
            return Err(Error::NoChallenge {
                name: name.to_owned(),
                offered: format!("{offered:?}"),
            });
        };
        let mut challenge =
            authorization
                .challenge(kind.acme())
                .ok_or_else(|| Error::NoChallenge {
                    name: name.to_owned(),
                    offered: format!("{offered:?}"),
                })?;
        let key_authorization = challenge.key_authorization();
        match kind {
            ChallengeKind::Http01 => {
                challenges.set_http01(&challenge.token, key_authorization.as_str());
                published.tokens.push(challenge.token.clone());
            }
            ChallengeKind::TlsAlpn01 => {
                let cert =
                    tls_alpn_certificate(name, key_authorization.digest().as_ref(), provider)?;
                challenges.set_tls_alpn01(name, cert);
                published.names.push(name.to_owned());
            }
        }
        debug!(challenge = ?kind, "challenge published");
        challenge.set_ready().await.map_err(acme)?;
    }

    let policy = RetryPolicy::new()
        .initial_delay(Duration::from_millis(100))
        .backoff(1.5)
        .timeout(config.order_timeout);
    let status = order.poll_ready(&policy).await.map_err(acme)?;
    if status != OrderStatus::Ready {
        return Err(Error::Invalid {
            name: name.to_owned(),
            detail: validation_detail(&mut order).await,
        });
    }
    drop(published);

    let generate = |source| Error::Generate {
        name: name.to_owned(),
        source,
    };
    let key = config.key_type.generate().map_err(generate)?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(generate)?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(generate)?;
    order.finalize_csr(csr.der()).await.map_err(acme)?;
    let chain_pem = order.poll_certificate(&policy).await.map_err(acme)?;
    Ok(CertPair {
        chain_pem,
        key_pem: key.serialize_pem(),
    })
}

/// What the CA said about a failed validation.
async fn validation_detail(order: &mut instant_acme::Order) -> String {
    let mut details = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        if authorization.refresh().await.is_err() {
            continue;
        }
        for challenge in &authorization.challenges {
            if let Some(problem) = &challenge.error {
                details.push(format!(
                    "{}: {}",
                    problem.r#type.as_deref().unwrap_or("error"),
                    problem.detail.as_deref().unwrap_or("")
                ));
            }
        }
    }
    if details.is_empty() {
        "the order became invalid".to_owned()
    } else {
        details.join("; ")
    }
}
