//! TLS to the database, as the store URL asks, with libpq's meanings of
//! `sslmode` and `sslrootcert` (so a URL that works with `psql` works here):
//!
//! | `sslmode` | TLS | the database's certificate |
//! |---|---|---|
//! | `disable` | never | – |
//! | `allow`, `prefer` (the default) | when the database offers it | not checked |
//! | `require` | always | not checked; checked as `verify-ca` when `sslrootcert` is given |
//! | `verify-ca` | always | signed by a CA of `sslrootcert` |
//! | `verify-full` | always | as `verify-ca`, and issued for the URL's host |
//!
//! `sslrootcert=PATH` names a PEM file of CA certificates;
//! `sslrootcert=system` uses the system's CA store and implies
//! `verify-full`, as in libpq. The handshake is rustls (with the `ring`
//! provider the gRPC side already uses), through `tokio-postgres-rustls`,
//! which also gives SCRAM its channel binding.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
pub(crate) use tokio_postgres_rustls::MakeRustlsConnect;

/// What the URL asks of TLS, read from its query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where the CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Roots {
    None,
    System,
    File(String),
}

/// The URL's connection settings and the TLS connector they need.
///
/// # Errors
/// What is wrong with the URL or its certificates, said so that the
/// operator knows what to change.
pub(crate) fn connection(url: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect), String> {
    let (rest, mode, roots) = split_tls_options(url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|error| format!("cannot parse the store URL: {error}"))?;
    config.ssl_mode(match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, &roots) {
        (Mode::Disable, _) | (Mode::Prefer | Mode::Require, Roots::None) => Arc::new(Unchecked {
            algorithms: provider.signature_verification_algorithms,
        }),
        (Mode::VerifyCa | Mode::VerifyFull, Roots::None) => {
            return Err(format!(
                "sslmode={}: name the CA that signed the database's certificate with \
                 sslrootcert=PATH (a PEM file), or sslrootcert=system for the system's CA store",
                mode.name()
            ));
        }
        (_, roots) => {
            let store = Arc::new(root_store(roots)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(store, provider.clone())
                .build()
                .map_err(|error| format!("sslrootcert: {error}"))?;
            if mode == Mode::VerifyFull || roots == &Roots::System {
                webpki
            } else {
                Arc::new(AnyName { webpki })
            }
        }
    };
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS to the database: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((config, MakeRustlsConnect::new(tls)))
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

/// Takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of the URL's
/// query (tokio-postgres knows only some of them) and returns the rest.
fn split_tls_options(url: &str) -> Result<(String, Mode, Roots), String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let mut mode = None;
    let mut roots = Roots::None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("the store URL's {key} is not UTF-8 once decoded"))?;
        match key {
            "sslmode" => {
                mode = Some(match &*value {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode={other}: use disable, allow, prefer, require, verify-ca or \
                             verify-full"
                        ));
                    }
                })
            }
            "sslrootcert" if value.is_empty() => {
                return Err("sslrootcert is empty: give a PEM file's path, or system".into());
            }
            "sslrootcert" if value == "system" => roots = Roots::System,
            "sslrootcert" => roots = Roots::File(value.into_owned()),
            "sslcert" | "sslkey" | "sslpassword" => {
                return Err(format!(
                    "{key}: client certificates are not supported; authenticate with a password \
                     in the URL (postgres://USER:PASSWORD@HOST/DB)"
                ));
            }
            _ => kept.push(pair),
        }
    }
    // As libpq: the system's CAs are only worth anything with the host
    // checked, and a CA file given makes `require` check the chain.
    let mode = match (mode.unwrap_or(Mode::Prefer), &roots) {
        (Mode::Disable, _) => Mode::Disable,
        (_, Roots::System) => Mode::VerifyFull,
        (Mode::Prefer | Mode::Require, Roots::File(_)) => Mode::VerifyCa,
        (mode, _) => mode,
    };
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, mode, roots))
}

/// The CA certificates `roots` names.
fn root_store(roots: &Roots) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::None => {}
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err(format!(
                    "sslrootcert=system: no CA certificate found in the system's store ({}); \
                     install ca-certificates, or name a PEM file with sslrootcert=PATH",
                    found
                        .errors
                        .first()
                        .map_or_else(|| "empty".to_owned(), ToString::to_string)
                ));
            }
            store.add_parsable_certificates(found.certs);
        }
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|error| format!("sslrootcert={path}: cannot read it: {error}"))?;
            if certs.is_empty() {
                return Err(format!(
                    "sslrootcert={path}: no certificate in it (a PEM file of \
                     -----BEGIN CERTIFICATE----- blocks is needed)"
                ));
            }
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|error| format!("sslrootcert={path}: {error}"))?;
            }
        }
    }
    Ok(store)
}

/// `verify-ca`: the chain is checked, the name is not.
#[derive(Debug)]
struct AnyName {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a CA: encrypted, the certificate taken
/// as it comes (libpq's meaning; the handshake's signatures are still
/// checked against the certificate presented).
#[derive(Debug)]
struct Unchecked {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_as_libpq_reads_them() {
        let base = "postgres://u@h:1/d";
        let cases = [
            ("", Mode::Prefer, Roots::None, base.to_owned()),
            (
                "?sslmode=disable",
                Mode::Disable,
                Roots::None,
                base.to_owned(),
            ),
            ("?sslmode=allow", Mode::Prefer, Roots::None, base.to_owned()),
            (
                "?sslmode=require",
                Mode::Require,
                Roots::None,
                base.to_owned(),
            ),
            (
                "?sslmode=require&sslrootcert=%2Ftmp%2Fca.pem",
                Mode::VerifyCa,
                Roots::File("/tmp/ca.pem".into()),
                base.to_owned(),
            ),
            (
                "?application_name=x&sslmode=verify-full&sslrootcert=system&connect_timeout=3",
                Mode::VerifyFull,
                Roots::System,
                format!("{base}?application_name=x&connect_timeout=3"),
            ),
            (
                "?sslrootcert=system",
                Mode::VerifyFull,
                Roots::System,
                base.to_owned(),
            ),
            (
                "?sslmode=disable&sslrootcert=system",
                Mode::Disable,
                Roots::System,
                base.to_owned(),
            ),
        ];
        for (query, mode, roots, rest) in cases {
            let url = format!("{base}{query}");
            assert_eq!(
                split_tls_options(&url).unwrap(),
                (rest, mode, roots),
                "{url}"
            );
        }
    }

    #[test]
    fn what_cannot_work_is_refused_with_what_to_change() {
        let cases = [
            ("?sslmode=verify", "use disable, allow, prefer"),
            ("?sslmode=verify-full", "sslrootcert=PATH"),
            ("?sslmode=verify-ca", "sslrootcert=PATH"),
            ("?sslrootcert=", "sslrootcert is empty"),
            ("?sslcert=/c.pem", "client certificates are not supported"),
            (
                "?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "sslrootcert=/nonexistent/ca.pem: cannot read it",
            ),
        ];
        for (query, expected) in cases {
            let url = format!("postgres://u@h:1/d{query}");
            let error = connection(&url).err().unwrap_or_default();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }
}
