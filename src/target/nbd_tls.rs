//! NBD over TLS: rustls's buffered `ServerConnection` over a connection's
//! non-blocking socket, on the reactor that owns the connection.
//!
//! The NBD poller calls [`TlsStream::recv`] and [`TlsStream::send`] where a plain
//! connection calls `recv` and `sendmsg`; both keep the non-blocking contract
//! (`WouldBlock` means try again when the socket is ready). Costs over plain
//! NBD: received records are decrypted in place in rustls's receive buffer and
//! copied once into the request's rx buffer or DMA buffer; replies are copied
//! once into rustls, which encrypts each record (up to 16 KiB) into a buffer of
//! its own, so the send path allocates one buffer per TLS record. Ciphertext is
//! written with one `sendmsg` of up to 64 records.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

/// Ciphertext rustls may hold for one connection before `send` stops accepting plaintext.
const TLS_BUFFERED_BYTES_MAX: usize = 256 << 10;

/// Loads the certificate chain and private key (PEM files) into a server configuration
/// (TLS 1.2 and 1.3, `ring` provider, no client certificates).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let read = |key_name: &str, p: &Path| {
        std::fs::read(p).map_err(|e| format!("nbd.{key_name} {}: {e}", p.display()))
    };
    let cert_pem = read("tls_cert", cert)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("nbd.tls_cert {}: bad PEM: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "nbd.tls_cert {}: no CERTIFICATE block in the file",
            cert.display()
        ));
    }
    let key_pem = read("tls_key", key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("nbd.tls_key {}: no usable private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("nbd tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| {
            format!(
                "nbd.tls_key {} does not fit nbd.tls_cert {}: {e}",
                key.display(),
                cert.display()
            )
        })?;
    Ok(Arc::new(cfg))
}

/// The connection's socket as `Read`/`Write` for rustls (non-blocking, no SIGPIPE).
struct Socket(RawFd);

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receiving into a valid mutable slice.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 64];
        let n_iov = bufs.len().min(iov.len());
        for (v, b) in iov.iter_mut().zip(bufs) {
            v.iov_base = b.as_ptr() as *mut libc::c_void;
            v.iov_len = b.len();
        }
        super::nbd::send_iovecs(self.0, &mut iov, n_iov).map_err(|fatal| {
            if fatal {
                io::Error::last_os_error()
            } else {
                io::ErrorKind::WouldBlock.into()
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One connection's TLS session after `NBD_OPT_STARTTLS`.
pub struct TlsStream {
    session: ServerConnection,
}

impl TlsStream {
    pub fn new(cfg: &Arc<ServerConfig>) -> Result<TlsStream, String> {
        let mut session = ServerConnection::new(cfg.clone()).map_err(|e| e.to_string())?;
        session.set_buffer_limit(Some(TLS_BUFFERED_BYTES_MAX));
        Ok(TlsStream { session })
    }

    /// Whether ciphertext (handshake, alerts, replies) waits for the socket.
    pub fn wants_write(&self) -> bool {
        self.session.wants_write()
    }

    /// Writes buffered ciphertext. `Ok(progress)`; `Err` when the socket failed.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<bool> {
        let mut progress = false;
        while self.session.wants_write() {
            match self.session.write_tls(&mut Socket(fd)) {
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    /// Receives decrypted bytes into `buf` (not empty). `Ok(0)` at the end of the stream;
    /// `WouldBlock` when no whole record is available.
    pub fn recv(&mut self, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        debug_assert!(!buf.is_empty());
        loop {
            match self.session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // rustls decrypts only up to its plaintext limit (16 KiB) per call, so whole
            // records read earlier may still wait in its buffer: process them before asking
            // the socket, or a drained socket would leave them there with no wake-up to come.
            let state = self
                .session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if state.plaintext_bytes_to_read() > 0 {
                continue;
            }
            if self.session.read_tls(&mut Socket(fd))? == 0 {
                return Ok(0);
            }
        }
    }

    /// Encrypts the first `n_iov` iovecs (as many bytes as the buffer limit takes) and
    /// starts sending them; the same contract as [`super::nbd::send_iovecs`]. Plaintext is
    /// accepted only once earlier ciphertext has left, so a slow reader holds back replies.
    pub fn send(&mut self, fd: RawFd, iov: &[libc::iovec], n_iov: usize) -> Result<usize, bool> {
        self.flush(fd).map_err(|_| true)?;
        if self.session.wants_write() {
            return Err(false);
        }
        let mut accepted = 0;
        for v in &iov[..n_iov] {
            // SAFETY: the caller's iovecs point into memory valid for the call.
            let bytes = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            let n = self.session.writer().write(bytes).map_err(|_| true)?;
            accepted += n;
            if n < bytes.len() {
                break;
            }
        }
        // A failure here shows up on the next call.
        let _ = self.flush(fd);
        if accepted == 0 {
            return Err(false);
        }
        Ok(accepted)
    }
}
