//! The tcp control (and data) connection of a transfer: plain, or TLS when the cluster's
//! internal plane runs it (`Sender::with_tls`, `ReceiverConfig::tls`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::{Result, TransferError};

/// One connection between a sender and a receiver.
pub enum Conn {
    /// Plain tcp.
    Plain(TcpStream),
    /// TLS over tcp (either side).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Conn {
    /// The socket underneath (for a non-blocking peek: with TLS, any record the receiver
    /// sends mid-transfer is a failure or a close, as a plain byte would be).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }

    /// Dials `addr` (`host:port`), over TLS with `tls` when given (the host is the name
    /// the receiver's certificate must carry).
    pub async fn connect(addr: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let Some(cfg) = tls else {
            return Ok(Conn::Plain(tcp));
        };
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| TransferError::Protocol(format!("target address {addr}: {e}")))?;
        let s = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| TransferError::Io(format!("tls handshake with {addr}: {e}")))?;
        Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Client(s))))
    }

    /// Accepts the TLS handshake of an accepted connection (or passes it through plain).
    pub async fn accept(tcp: TcpStream, tls: Option<&Arc<rustls::ServerConfig>>) -> Result<Self> {
        let Some(cfg) = tls else {
            return Ok(Conn::Plain(tcp));
        };
        let s = tokio_rustls::TlsAcceptor::from(cfg.clone())
            .accept(tcp)
            .await
            .map_err(|e| TransferError::Io(format!("tls handshake: {e}")))?;
        Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(s))))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
