//! Serving certificates: from PEM files (re-read on an interval, so a
//! rotated Secret is picked up without a restart) or self-signed at start-up
//! with the CA written into the webhook configurations' `caBundle`.
//!
//! TLS 1.2 and 1.3 only, ring provider (the one kube's client uses).
//! Calls the API only to patch `caBundle` in self-signed mode.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use kube::Client;
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use crate::Error;

/// How many CAs a shared `caBundle` keeps: each self-signed replica adds its
/// own, so replicas started together all stay trusted.
const MAX_BUNDLED_CAS: usize = 4;

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

/// A fresh CA and a serving certificate it signed for `names` (DNS names
/// or IPs): `(ca_pem, cert_pem, key_pem)`. rcgen makes X.509 v3.
pub fn self_signed(names: &[String]) -> Result<(String, String, String), Error> {
    let tls = |e: rcgen::Error| Error::Tls(e.to_string());
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    ca_params.distinguished_name.push(DnType::CommonName, "svcplane-webhook-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(tls)?).map_err(tls)?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(tls)?;
    params
        .distinguished_name
        .push(DnType::CommonName, names.first().map(String::as_str).unwrap_or("svcplane-webhook"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(tls)?;
    let cert = params.signed_by(&key, &ca).map_err(tls)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// Adds `ca_pem` to the `caBundle` of every webhook in the named
/// configurations, keeping the most recent [`MAX_BUNDLED_CAS`] CAs.
pub async fn patch_ca_bundle(
    client: &Client,
    mutating: Option<&str>,
    validating: Option<&str>,
    ca_pem: &str,
) -> Result<(), Error> {
    for _attempt in 0..5 {
        let mut conflict = false;
        if let Some(name) = mutating {
            conflict |= !add_ca::<MutatingWebhookConfiguration>(client, name, ca_pem, |c| {
                c.webhooks.iter_mut().flatten().map(|h| &mut h.client_config).collect()
            })
            .await?;
        }
        if let Some(name) = validating {
            conflict |= !add_ca::<ValidatingWebhookConfiguration>(client, name, ca_pem, |c| {
                c.webhooks.iter_mut().flatten().map(|h| &mut h.client_config).collect()
            })
            .await?;
        }
        if !conflict {
            return Ok(());
        }
    }
    Err(Error::Tls("caBundle patch kept conflicting".to_owned()))
}

/// Adds `ca_pem` to every webhook's caBundle in the configuration `name`;
/// `Ok(false)` when the write lost a race (409) and should be retried.
async fn add_ca<K>(
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
    let api_err = |e: kube::Error| Error::Kube { what: "patch caBundle".to_owned(), source: e };
    let api: Api<K> = Api::all(client.clone());
    let mut config = api.get(name).await.map_err(api_err)?;
    for cc in client_configs(&mut config) {
        cc.ca_bundle = Some(merge_bundle(cc.ca_bundle.as_ref(), ca_pem));
    }
    match api.replace(name, &PostParams::default(), &config).await {
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        other => other.map(|_| true).map_err(api_err),
    }
}

fn merge_bundle(existing: Option<&ByteString>, ca_pem: &str) -> ByteString {
    let text = existing.map(|b| String::from_utf8_lossy(&b.0).into_owned()).unwrap_or_default();
    let mut blocks: Vec<String> = text
        .split_inclusive("-----END CERTIFICATE-----")
        .map(|b| b.trim().to_owned())
        .filter(|b| b.contains("BEGIN CERTIFICATE") && b.as_str() != ca_pem.trim())
        .collect();
    blocks.push(ca_pem.trim().to_owned());
    let keep = blocks.len().saturating_sub(MAX_BUNDLED_CAS);
    ByteString(format!("{}\n", blocks[keep..].join("\n")).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_makes_a_tls_config() {
        let (ca, cert, key) = self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(ca.contains("BEGIN CERTIFICATE"));
        server_config(cert.as_bytes(), key.as_bytes()).unwrap();
    }

    #[test]
    fn bundle_keeps_the_newest_cas() {
        let mut bundle: Option<ByteString> = None;
        let cas: Vec<String> = (0..6).map(|_| self_signed(&["x".into()]).unwrap().0).collect();
        for ca in &cas {
            bundle = Some(merge_bundle(bundle.as_ref(), ca));
        }
        let text = String::from_utf8(bundle.unwrap().0).unwrap();
        assert_eq!(text.matches("BEGIN CERTIFICATE").count(), MAX_BUNDLED_CAS);
        assert!(text.contains(cas[5].trim()));
        assert!(!text.contains(cas[0].trim()));
    }
}
