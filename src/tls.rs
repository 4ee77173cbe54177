//! TLS material: PEM files read and checked before anything starts, so a
//! missing file, a file with no certificate, or a key that does not match
//! its certificate is a start-up error naming the file, not a failed
//! handshake later.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no PEM certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A file holds no PEM private key.
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is not the certificate's.
    #[error("the key in {key} does not match the certificate in {cert}: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a PEM file that must hold at least one certificate.
///
/// # Errors
/// [`TlsError::Read`] or [`TlsError::NoCertificate`], naming the file.
pub fn read_certificates(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(path)?;
    let found = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .count();
    if found == 0 {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(pem)
}

/// A certificate chain and its private key, as PEM.
#[derive(Clone)]
pub struct Identity {
    /// The certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// The private key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Identity { .. }")
    }
}

impl Identity {
    /// Reads a certificate and its key and checks that they belong together.
    ///
    /// # Errors
    /// A [`TlsError`] naming the file at fault.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let cert = read_certificates(cert_path)?;
        let key = read(key_path)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
            .filter_map(Result::ok)
            .collect();
        let private = PrivateKeyDer::from_pem_slice(&key).map_err(|_| TlsError::NoKey {
            path: key_path.to_path_buf(),
        })?;
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(chain, private, &provider).map_err(|e| {
            TlsError::Mismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self { cert, key })
    }
}

/// The server's TLS: its identity, and the CA its clients' certificates
/// must chain to when mutual TLS is on.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// Certificate and key.
    pub identity: Identity,
    /// PEM CA certificates for client certificates; `None`: no mutual TLS.
    pub client_ca: Option<Vec<u8>>,
}

/// A client's TLS: the CA to trust, the name to expect, and optionally a
/// client certificate for mutual TLS.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// PEM CA certificates that the server's certificate must chain to.
    pub ca: Option<Vec<u8>>,
    /// The name to check the server's certificate against (default: the
    /// address's host).
    pub domain: Option<String>,
    /// A client certificate and key, for servers that require one.
    pub identity: Option<Identity>,
}
