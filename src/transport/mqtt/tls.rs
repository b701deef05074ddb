//! MQTT over TLS (rustls): the server certificate, and optionally device certificates checked
//! against a CA, where the device id is the certificate's subject CN — how AWS IoT and
//! Foundries devices authenticate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use super::super::TransportError;
use crate::config::MqttConfig;

fn bad(key: &'static str, why: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(format!("{key}: {why}"))
}

pub(in crate::transport) fn certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(key, format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(bad(key, format!("{}: no PEM certificate in it", path.display())));
    }
    Ok(certs)
}

/// The acceptor for `mqtt.tls_listen`, and whether devices must show a certificate.
pub(super) fn acceptor(cfg: &MqttConfig) -> Result<(TlsAcceptor, bool), TransportError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certs("mqtt.tls_cert", &cfg.tls_cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.tls_key)
        .map_err(|e| bad("mqtt.tls_key", format!("{}: {e}", cfg.tls_key.display())))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("mqtt.tls_listen", e))?;
    let client_certs = !cfg.tls_client_ca.as_os_str().is_empty();
    let builder = if client_certs {
        let mut roots = RootCertStore::empty();
        for c in certs("mqtt.tls_client_ca", &cfg.tls_client_ca)? {
            roots.add(c).map_err(|e| bad("mqtt.tls_client_ca", e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| bad("mqtt.tls_client_ca", e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| bad("mqtt.tls_key", e))?;
    Ok((TlsAcceptor::from(Arc::new(config)), client_certs))
}

/// The subject common name of a (verified) device certificate.
pub(super) fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_owned())
}
