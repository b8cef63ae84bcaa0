//! TLS for `tls` listeners: the rustls server configuration built from a
//! listener's PEM files, once at start (the broker reads the files; the
//! only I/O here) and shared read-only by every shard.
//!
//! One crypto provider, chosen explicitly: *ring*. TLS 1.3 and 1.2. With
//! `tls_client_ca_file`, client certificates are asked for and checked
//! against those CAs (required with `tls_client_cert_required`).
//!
//! A connection's TLS state (`rustls::ServerConnection`) belongs to the
//! shard that serves it: the accepting shard runs the handshake and reads
//! CONNECT through it, and when the client's home shard is another, the
//! state moves there with the socket (see `shard::mesh::Handoff`), so TLS
//! is terminated where the session lives, as plain TCP is.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::ListenerConfig;

/// A listener's TLS files could not be used.
#[derive(Debug, thiserror::Error)]
#[error("listener {bind}: {what} {path}: {why}")]
pub struct TlsError {
    /// The listener's address.
    pub bind: String,
    /// Which file (`tls_cert_file`, ...).
    pub what: &'static str,
    /// Its path.
    pub path: String,
    /// Why.
    pub why: String,
}

/// The server configuration of a `tls` listener.
pub fn server_config(l: &ListenerConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let err = |what: &'static str, path: &Path, why: String| TlsError {
        bind: l.bind.to_string(),
        what,
        path: path.display().to_string(),
        why,
    };
    let certs =
        read_certs(&l.tls_cert_file).map_err(|e| err("tls_cert_file", &l.tls_cert_file, e))?;
    let key = PrivateKeyDer::from_pem_file(&l.tls_key_file)
        .map_err(|e| err("tls_key_file", &l.tls_key_file, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err("tls_cert_file", &l.tls_cert_file, e.to_string()))?;
    let ca = &l.tls_client_ca_file;
    let builder = if ca.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca).map_err(|e| err("tls_client_ca_file", ca, e))? {
            roots
                .add(c)
                .map_err(|e| err("tls_client_ca_file", ca, e.to_string()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = match l.tls_client_cert_required {
            true => verifier.build(),
            false => verifier.allow_unauthenticated().build(),
        }
        .map_err(|e| err("tls_client_ca_file", ca, e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| err("tls_key_file", &l.tls_key_file, e.to_string()))?;
    Ok(Arc::new(config))
}

/// Every certificate of a PEM file (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}
