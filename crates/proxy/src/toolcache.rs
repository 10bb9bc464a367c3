//! The proxy's side of the toolchain cache (docs/dev-env.md, "The
//! toolchain cache"): which requests may use it, the response body that
//! fills it as it passes to the guest, and the body that answers from it.
//! The store itself, and what it guarantees, is the `sandpen-toolcache`
//! crate.

use std::fs::File;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::Method;
use hyper::body::{Body, Frame, SizeHint};

pub use sandpen_toolcache::{
    artifact_host, upstream_identity, ArtifactHost, Filling, Hit, ToolCache, ARTIFACT_HOSTS,
};

/// Whether a request may be answered from, or fill, the cache: a plain
/// `GET` of an artifact path, whole (no `Range`, no conditions).
pub fn cacheable_request(host: &ArtifactHost, method: &Method, path: &str, h: &HeaderMap) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    method == Method::GET
        && (host.artifact)(path)
        && !path.contains("/../")
        && !path.contains("/./")
        && ![
            header::RANGE,
            header::IF_RANGE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_UNMODIFIED_SINCE,
        ]
        .iter()
        .any(|n| h.contains_key(n))
}

/// A response body that fills the cache as it passes to the guest.
pub(crate) struct Teed<B> {
    pub(crate) inner: B,
    pub(crate) fill: Option<Filling>,
}

impl<B> Teed<B> {
    fn done(&mut self) {
        if let Some(fill) = self.fill.take() {
            let url = fill.url().to_string();
            match fill.finish() {
                Ok(sha) => tracing::info!("toolchain cache: stored {url} as sha256 {sha}"),
                Err(e) => tracing::warn!("toolchain cache: {url} not stored: {e}"),
            }
        }
    }
}

impl<B> Body for Teed<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(fill) = self.fill.as_mut() {
                        if let Err(e) = fill.write(data) {
                            tracing::warn!("toolchain cache: {} not stored: {e}", fill.url());
                            self.fill = None;
                        }
                    }
                }
                if self.inner.is_end_stream() {
                    self.done();
                }
            }
            Poll::Ready(None) => self.done(),
            Poll::Ready(Some(Err(_))) => self.fill = None,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A cached body, read as the guest takes it. A read error ends it early,
/// which the `Content-Length` sent makes a failed transfer, never a short
/// file taken as whole.
pub(crate) struct FileBody {
    pub(crate) file: File,
    pub(crate) left: u64,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(256 * 1024) as usize;
        let mut buf = vec![0u8; n];
        match self.file.read(&mut buf) {
            Ok(0) | Err(_) => {
                self.left = 0;
                Poll::Ready(None)
            }
            Ok(got) => {
                buf.truncate(got);
                self.left -= got as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_artifact_host_is_in_the_balanced_preset() {
        let rules = sandpen_policy::Preset::Balanced.rules();
        for h in ARTIFACT_HOSTS {
            let target = format!("{}:443", h.host);
            assert!(
                rules.iter().any(|r| r.target.to_string() == target),
                "{target} is not in balanced"
            );
        }
    }

    #[test]
    fn range_and_conditional_requests_bypass_the_cache() {
        let node = artifact_host("nodejs.org").unwrap();
        let path = "/dist/v22.1.0/SHASUMS256.txt";
        assert!(cacheable_request(
            node,
            &Method::GET,
            path,
            &HeaderMap::new()
        ));
        assert!(!cacheable_request(
            node,
            &Method::HEAD,
            path,
            &HeaderMap::new()
        ));
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, "bytes=0-1".parse().unwrap());
        assert!(!cacheable_request(node, &Method::GET, path, &h));
    }
}
