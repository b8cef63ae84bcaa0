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

use crate::config::{ListenerConfig, Transport};

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

/// Which identity of a client certificate becomes the user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertIdentity {
    /// None: the CONNECT's user name and password count.
    None,
    /// The subject's common name.
    CommonName,
    /// The whole subject, RFC 2253.
    Subject,
}

/// What a `tls` listener's connections start with.
#[derive(Debug)]
pub struct TlsListener {
    /// The rustls configuration.
    pub config: Arc<ServerConfig>,
    /// What names a certificate's holder.
    pub identity: CertIdentity,
}

/// Per listener, in order: its TLS configuration from its files (`tls`
/// and `wss`), or None (`tcp` and `ws`).
pub fn listeners(list: &[ListenerConfig]) -> Result<Vec<Option<Arc<TlsListener>>>, TlsError> {
    list.iter()
        .map(|l| match l.transport() {
            Transport::Tls | Transport::Wss => listener(l).map(Some),
            Transport::Tcp | Transport::Ws => Ok(None),
        })
        .collect()
}

/// A `tls` listener's configuration, from its files.
fn listener(l: &ListenerConfig) -> Result<Arc<TlsListener>, TlsError> {
    let identity = match l.username_from_cert.as_str() {
        "cn" => CertIdentity::CommonName,
        "dn" => CertIdentity::Subject,
        _ => CertIdentity::None,
    };
    Ok(Arc::new(TlsListener {
        config: server_config(l)?,
        identity,
    }))
}

/// The user name a client certificate (DER, checked by the handshake)
/// gives under `identity`; None when it has none (no common name).
pub fn cert_user(der: &[u8], identity: CertIdentity) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert.subject();
    match identity {
        CertIdentity::None => None,
        CertIdentity::CommonName => subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        CertIdentity::Subject => {
            let registry = x509_parser::objects::oid_registry();
            // RFC 2253: the last RDN first, attributes `type=value`.
            let rdns: Vec<_> = subject.iter().collect();
            let parts: Vec<String> = rdns
                .into_iter()
                .rev()
                .flat_map(|rdn| rdn.iter())
                .map(|attr| {
                    let oid = attr.attr_type();
                    let name = x509_parser::objects::oid2abbrev(oid, registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| oid.to_id_string());
                    let value = attr.as_str().map(escape_2253).unwrap_or_default();
                    format!("{name}={value}")
                })
                .collect();
            (!parts.is_empty()).then(|| parts.join(","))
        }
    }
}

/// An attribute value escaped as RFC 2253 says.
fn escape_2253(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == '#' || c == ' ')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The server configuration of a `tls` listener.
fn server_config(l: &ListenerConfig) -> Result<Arc<ServerConfig>, TlsError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_its_user_by_common_name_or_whole_subject() {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CountryName, "DE");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme, Inc");
        params
            .distinguished_name
            .push(DnType::CommonName, "device-7");
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der();
        assert_eq!(
            cert_user(der, CertIdentity::CommonName).as_deref(),
            Some("device-7")
        );
        // RFC 2253 lists the RDNs last first; rcgen picks their order, so
        // only the parts and the escaping are checked.
        let dn = cert_user(der, CertIdentity::Subject).unwrap();
        for part in ["CN=device-7", "O=Acme\\, Inc", "C=DE"] {
            assert!(dn.contains(part), "{dn}");
        }
        assert_eq!(dn.len(), "CN=device-7,O=Acme\\, Inc,C=DE".len(), "{dn}");
        assert_eq!(cert_user(der, CertIdentity::None), None);
        assert_eq!(cert_user(b"junk", CertIdentity::CommonName), None);
    }

    #[test]
    fn rfc_2253_escapes() {
        assert_eq!(escape_2253("a,b"), "a\\,b");
        assert_eq!(escape_2253(" x "), "\\ x\\ ");
        assert_eq!(escape_2253("#1"), "\\#1");
        assert_eq!(escape_2253("plain"), "plain");
    }
}
