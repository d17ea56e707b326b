//! The PEM files TLS flags name (`--tls-cert`, `--tls-key`, `--tls-ca`,
//! `--node-client-ca`), read once at start-up and checked for what they must
//! hold, so a wrong path or a file of the wrong kind stops the process with
//! an error naming the flag instead of failing every connection later.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {}: no PEM certificate (`-----BEGIN CERTIFICATE-----`) in the file", path.display())]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file", path.display())]
    NoPrivateKey { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: invalid PEM: {reason}", path.display())]
    Invalid { flag: &'static str, path: PathBuf, reason: String },
}

/// The PEM text of `path`, which must hold one or more certificates (a
/// chain, or the CA certificates to trust).
pub fn read_certificates(flag: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    let pem = read(flag, path)?;
    let mut found = false;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| PemError::Invalid { flag, path: path.to_owned(), reason: e.to_string() })?;
        found = true;
    }
    if !found {
        return Err(PemError::NoCertificate { flag, path: path.to_owned() });
    }
    Ok(pem)
}

/// The PEM text of `path`, which must hold a private key.
pub fn read_private_key(flag: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    let pem = read(flag, path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(_) => Ok(pem),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(PemError::NoPrivateKey { flag, path: path.to_owned() }),
        Err(e) => Err(PemError::Invalid { flag, path: path.to_owned(), reason: e.to_string() }),
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read { flag, path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway file under the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &str) -> Self {
            let path = std::env::temp_dir().join(format!("kt-pem-{}", uuid::Uuid::new_v4()));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn test_errors_name_the_flag_and_the_file() {
        let missing = Path::new("/nonexistent/kt/cert.pem");
        let e = read_certificates("--tls-cert", missing).unwrap_err();
        assert!(matches!(e, PemError::Read { .. }), "{e}");
        assert!(e.to_string().starts_with("--tls-cert /nonexistent/kt/cert.pem: "), "{e}");

        let not_pem = TempFile::new("hello\n");
        let e = read_certificates("--tls-ca", &not_pem.0).unwrap_err();
        assert!(matches!(e, PemError::NoCertificate { flag: "--tls-ca", .. }), "{e}");
        let e = read_private_key("--tls-key", &not_pem.0).unwrap_err();
        assert!(matches!(e, PemError::NoPrivateKey { flag: "--tls-key", .. }), "{e}");
    }

    #[test]
    fn test_a_certificate_is_not_a_key_and_the_other_way_round() {
        // Structure only: the PEM layer does not parse what is inside.
        let cert = TempFile::new("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let key = TempFile::new("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        assert!(read_certificates("--tls-cert", &cert.0).is_ok());
        assert!(matches!(read_private_key("--tls-key", &cert.0), Err(PemError::NoPrivateKey { .. })));
        assert!(read_private_key("--tls-key", &key.0).is_ok());
        assert!(matches!(read_certificates("--tls-cert", &key.0), Err(PemError::NoCertificate { .. })));
    }
}
