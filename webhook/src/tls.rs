//! Serving certificates: from PEM files (re-read on an interval, so a
//! rotated Secret is picked up without a restart) or, in self-signed mode,
//! signed at start-up by one CA that every replica shares.
//!
//! The shared CA lives in a Secret (type `kubernetes.io/tls`: the CA certificate
//! in `tls.crt`, its key in `tls.key`). Creating it is the lock: the first
//! replica's create succeeds and every other replica gets 409 AlreadyExists and
//! reads the winner's. Each replica signs its own serving certificate with that
//! CA, and the webhook configurations' `caBundle` is set to exactly that CA, so
//! no replica can push out another's trust. A Secret that exists but cannot be
//! used is an error naming it, never overwritten.
//!
//! TLS 1.2 and 1.3 only, ring provider (the one kube's client uses).
//! Calls the API only in self-signed mode: creates or reads the CA Secret and
//! sets `caBundle`; the certificate code is pure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::ServerConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tracing::{info, warn};

use crate::Error;

/// Key of the CA certificate in the CA Secret.
pub const CA_SECRET_CERT: &str = "tls.crt";
/// Key of the CA's private key in the CA Secret.
pub const CA_SECRET_KEY: &str = "tls.key";
/// Common name of the shared CA. Serving certificates name it as their issuer,
/// so it must stay what it was when the CA in the Secret was made.
const CA_COMMON_NAME: &str = "svcplane-webhook-ca";

/// A rustls server configuration for `cert_pem` (chain) and `key_pem`.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, Error> {
    let tls = |e: &dyn std::fmt::Display| Error::Tls(e.to_string());
    let certs =
        CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| tls(&e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads the certificate and key files.
pub async fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let read = |path: PathBuf| async move {
        tokio::fs::read(&path).await.map_err(|e| Error::Tls(format!("read {}: {e}", path.display())))
    };
    Ok((read(cert.to_path_buf()).await?, read(key.to_path_buf()).await?))
}

/// Re-reads the files every `interval` and swaps the configuration when
/// they changed. A bad pair is logged and the old one kept.
pub async fn reload_loop(
    config: RustlsConfig,
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
    mut last: (Vec<u8>, Vec<u8>),
) {
    loop {
        tokio::time::sleep(interval).await;
        let Ok(pair) = read_pair(&cert, &key).await else { continue };
        if pair == last {
            continue;
        }
        match server_config(&pair.0, &pair.1) {
            Ok(new) => {
                config.reload_from_config(new);
                info!(cert = %cert.display(), "reloaded serving certificate");
                last = pair;
            }
            Err(error) => warn!(%error, "ignoring unusable certificate files"),
        }
    }
}

/// A CA: its certificate and private key, both PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPair {
    /// The self-signed CA certificate (what goes into `caBundle`).
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// A serving certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct ServingPair {
    /// The certificate, signed by the CA.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// The CA's parameters: the issuer of a serving certificate is rebuilt from
/// these and the stored key, so they must not change.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ok(params)
}

/// A fresh CA (rcgen makes X.509 v3).
pub fn generate_ca() -> Result<CaPair, Error> {
    let tls = |e: rcgen::Error| Error::Tls(e.to_string());
    let key = KeyPair::generate().map_err(tls)?;
    let cert = ca_params().map_err(tls)?.self_signed(&key).map_err(tls)?;
    Ok(CaPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A serving certificate for `names` (DNS names or IPs) signed by `ca`, with a
/// fresh key. It is checked against `ca.cert_pem` as the apiserver will check
/// it, so a CA whose key or name does not match its certificate is refused
/// here rather than by every admission call. The error says what is wrong.
pub fn sign_serving_cert(ca: &CaPair, names: &[String]) -> Result<ServingPair, String> {
    let verify_as = names
        .iter()
        .find_map(|name| ServerName::try_from(name.clone()).ok())
        .ok_or_else(|| format!("no DNS name or IP in {names:?} to sign a serving certificate for"))?;
    let ca_key =
        KeyPair::from_pem(&ca.key_pem).map_err(|e| format!("{CA_SECRET_KEY} is not a private key: {e}"))?;
    let issuer = Issuer::new(ca_params().map_err(|e| e.to_string())?, ca_key);
    let mut params = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, names.first().map(String::as_str).unwrap_or("svcplane-webhook"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    verify_chain(&ca.cert_pem, cert.der(), &verify_as)?;
    Ok(ServingPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Checks that `leaf` chains to the certificate in `ca_pem` for `name`.
fn verify_chain(ca_pem: &str, leaf: &CertificateDer<'_>, name: &ServerName<'_>) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{CA_SECRET_CERT} is not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{CA_SECRET_CERT} holds no certificate"));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| format!("{CA_SECRET_CERT} is not a usable CA certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?;
    verifier.verify_server_cert(leaf, &[], name, &[], UnixTime::now()).map(|_| ()).map_err(|e| {
        format!("a certificate signed with {CA_SECRET_KEY} does not verify against {CA_SECRET_CERT}: {e}")
    })
}

/// The CA Secret `namespace/name` holding `ca`.
pub fn build_ca_secret(namespace: &str, name: &str, ca: &CaPair) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_owned(), "svcplane".to_owned()),
                ("app.kubernetes.io/component".to_owned(), "webhook-ca".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (CA_SECRET_CERT.to_owned(), ByteString(ca.cert_pem.clone().into_bytes())),
            (CA_SECRET_KEY.to_owned(), ByteString(ca.key_pem.clone().into_bytes())),
        ])),
        ..Secret::default()
    }
}

/// The CA a Secret holds; the error says which key is missing or not text.
/// Whether the pair is usable is checked by [`sign_serving_cert`].
pub fn ca_from_secret(secret: &Secret) -> Result<CaPair, String> {
    let text = |key: &str| -> Result<String, String> {
        let bytes =
            secret.data.as_ref().and_then(|data| data.get(key)).ok_or_else(|| format!("it has no {key}"))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| format!("{key} is not PEM text"))
    };
    Ok(CaPair { cert_pem: text(CA_SECRET_CERT)?, key_pem: text(CA_SECRET_KEY)? })
}

/// The serving certificate of this replica in self-signed mode and the shared
/// CA that signed it: the CA comes from the Secret `namespace/name`, which this
/// call creates when it does not exist yet (create is the lock: on 409 it
/// reads the winner's CA).
pub async fn self_signed_from_shared_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    names: &[String],
) -> Result<(CaPair, ServingPair), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = format!("{namespace}/{name}");
    let fresh = generate_ca()?;
    // A Secret deleted between our 409 and our read is created again.
    for _attempt in 0..3 {
        match api.create(&PostParams::default(), &build_ca_secret(namespace, name, &fresh)).await {
            Ok(_) => {
                info!(%secret, "created the shared webhook CA");
                let serving = sign_serving_cert(&fresh, names).map_err(Error::Tls)?;
                return Ok((fresh, serving));
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => return Err(Error::Kube { what: format!("create Secret {secret}"), source }),
        }
        let existing = api
            .get_opt(name)
            .await
            .map_err(|source| Error::Kube { what: format!("get Secret {secret}"), source })?;
        let Some(existing) = existing else { continue };
        let unusable = |problem: String| Error::CaSecret { secret: secret.clone(), problem };
        let ca = ca_from_secret(&existing).map_err(unusable)?;
        let serving = sign_serving_cert(&ca, names).map_err(unusable)?;
        info!(%secret, "using the shared webhook CA");
        return Ok((ca, serving));
    }
    Err(Error::Tls(format!("Secret {secret} kept disappearing between create and get")))
}

/// Sets the `caBundle` of every webhook in the named configurations to exactly
/// `ca_pem`. A configuration that already has it is not written.
pub async fn set_ca_bundle(
    client: &Client,
    mutating: Option<&str>,
    validating: Option<&str>,
    ca_pem: &str,
) -> Result<(), Error> {
    for _attempt in 0..5 {
        let mut conflict = false;
        if let Some(name) = mutating {
            conflict |= !apply_ca::<MutatingWebhookConfiguration>(client, name, ca_pem, |c| {
                c.webhooks.iter_mut().flatten().map(|h| &mut h.client_config).collect()
            })
            .await?;
        }
        if let Some(name) = validating {
            conflict |= !apply_ca::<ValidatingWebhookConfiguration>(client, name, ca_pem, |c| {
                c.webhooks.iter_mut().flatten().map(|h| &mut h.client_config).collect()
            })
            .await?;
        }
        if !conflict {
            return Ok(());
        }
    }
    Err(Error::Tls("caBundle update kept conflicting".to_owned()))
}

/// Sets every webhook's caBundle in the configuration `name` to `ca_pem`;
/// `Ok(false)` when the write lost a race (409) and should be retried.
async fn apply_ca<K>(
    client: &Client,
    name: &str,
    ca_pem: &str,
    client_configs: for<'a> fn(&'a mut K) -> Vec<&'a mut WebhookClientConfig>,
) -> Result<bool, Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api_err = |e: kube::Error| Error::Kube { what: format!("set the caBundle of {name}"), source: e };
    let api: Api<K> = Api::all(client.clone());
    let mut config = api.get(name).await.map_err(api_err)?;
    if !set_bundle(client_configs(&mut config), ca_pem) {
        return Ok(true);
    }
    match api.replace(name, &PostParams::default(), &config).await {
        Ok(_) => {
            info!(configuration = name, "set caBundle to the shared CA");
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(api_err(e)),
    }
}

/// Sets each caBundle to exactly `ca_pem`; false when every one already was.
fn set_bundle(client_configs: Vec<&mut WebhookClientConfig>, ca_pem: &str) -> bool {
    let mut changed = false;
    for cc in client_configs {
        if cc.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca_pem.as_bytes()) {
            cc.ca_bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["svcplane-webhook.svcplane-system.svc".into(), "127.0.0.1".into()]
    }

    #[test]
    fn replicas_sign_different_keys_under_one_shared_ca() {
        let ca = generate_ca().unwrap();
        let a = sign_serving_cert(&ca, &names()).unwrap();
        let b = sign_serving_cert(&ca, &names()).unwrap();
        assert_ne!(a.key_pem, b.key_pem, "each replica has its own serving key");
        for pair in [&a, &b] {
            server_config(pair.cert_pem.as_bytes(), pair.key_pem.as_bytes()).unwrap();
            let leaf = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap();
            for name in names() {
                verify_chain(&ca.cert_pem, &leaf, &ServerName::try_from(name).unwrap()).unwrap();
            }
        }
    }

    #[test]
    fn the_ca_survives_a_round_trip_through_its_secret() {
        let ca = generate_ca().unwrap();
        let secret = build_ca_secret("svcplane-system", "svcplane-webhook-ca", &ca);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(ca_from_secret(&secret).unwrap(), ca);
    }

    #[test]
    fn a_secret_without_the_key_says_which_key_is_missing() {
        let ca = generate_ca().unwrap();
        let mut secret = build_ca_secret("ns", "ca", &ca);
        secret.data.as_mut().unwrap().remove(CA_SECRET_KEY);
        assert_eq!(ca_from_secret(&secret).unwrap_err(), "it has no tls.key");
        secret.data = None;
        assert_eq!(ca_from_secret(&secret).unwrap_err(), "it has no tls.crt");
    }

    #[test]
    fn a_ca_whose_parts_do_not_belong_together_is_refused() {
        let ca = generate_ca().unwrap();
        let other = generate_ca().unwrap();
        let mixed = CaPair { cert_pem: ca.cert_pem.clone(), key_pem: other.key_pem.clone() };
        let error = sign_serving_cert(&mixed, &names()).unwrap_err();
        assert!(error.contains("does not verify against tls.crt"), "{error}");

        let garbage_key = CaPair { cert_pem: ca.cert_pem.clone(), key_pem: "not a key".into() };
        let error = sign_serving_cert(&garbage_key, &names()).unwrap_err();
        assert!(error.contains("tls.key is not a private key"), "{error}");

        let garbage_cert = CaPair { cert_pem: "not a cert".into(), key_pem: ca.key_pem.clone() };
        let error = sign_serving_cert(&garbage_cert, &names()).unwrap_err();
        assert!(error.contains("tls.crt holds no certificate"), "{error}");
    }

    #[test]
    fn the_bundle_becomes_exactly_the_shared_ca_and_is_not_rewritten() {
        let ca = generate_ca().unwrap();
        let stale = format!("{}{}", generate_ca().unwrap().cert_pem, generate_ca().unwrap().cert_pem);
        let mut configs = vec![
            WebhookClientConfig { ca_bundle: Some(ByteString(stale.into_bytes())), ..Default::default() },
            WebhookClientConfig::default(),
        ];
        assert!(set_bundle(configs.iter_mut().collect(), &ca.cert_pem));
        for cc in &configs {
            assert_eq!(cc.ca_bundle.as_ref().unwrap().0, ca.cert_pem.as_bytes());
        }
        assert!(!set_bundle(configs.iter_mut().collect(), &ca.cert_pem), "already set: no write");
    }
}
