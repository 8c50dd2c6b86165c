//! Framing of the sync stream: each frame is a 4-byte little-endian length
//! followed by one encoded `Frame`. A frame longer than `MAX_FRAME_BYTES`,
//! a stream that ends inside a frame, or bytes that do not decode are
//! errors that end the session; they never panic and never reach the store.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use ocmesh_proto::federation::{Frame, Hello, MeshHello, MeshHelloFrame};

/// Largest accepted frame: a batch's byte budget plus one maximal change.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES} byte limit")]
    TooLarge(usize),
    #[error("stream ended inside a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("frame does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame; `Ok(None)` when the stream ends cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<Option<Frame>, FrameError> {
    let mut len = [0u8; 4];
    let got = read_full(r, &mut len).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < 4 {
        return Err(FrameError::Truncated { got, want: 4 });
    }
    let want = u32::from_le_bytes(len) as usize;
    if want > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(want));
    }
    // The buffer grows with the bytes that arrive, not with the length the
    // peer claims: a 32 MiB claim followed by ten bytes costs ten bytes.
    buf.clear();
    let mut got = 0;
    while got < want {
        let step = (want - got).min(READ_STEP);
        buf.resize(got + step, 0);
        let n = read_full(r, &mut buf[got..]).await?;
        got += n;
        if n < step {
            buf.truncate(got);
            return Err(FrameError::Truncated { got, want });
        }
    }
    Ok(Some(Frame::decode(buf.as_slice())?))
}

/// How much more of a frame's buffer is allocated at a time.
const READ_STEP: usize = 256 * 1024;

/// Reads until `buf` is full or the stream ends; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Encodes `frame` with its length prefix.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let len = frame.encoded_len();
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    frame
        .encode(&mut out)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(out)
}

/// Encodes a frame holding `hello` with the mesh shell's fields
/// (`MeshHello`) appended inside the hello: a peer reads the same `Hello`
/// from it, plus `incarnation` if it knows the field.
pub fn encode_hello_frame(hello: &Hello, incarnation: u64) -> Result<Vec<u8>, FrameError> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut inner = hello.encode_to_vec();
    inner.extend(MeshHello { incarnation }.encode_to_vec());
    // `Frame.hello` is field 1, an embedded message: key, length, bytes.
    let mut body = Vec::with_capacity(inner.len() + 11);
    encode_key(1, WireType::LengthDelimited, &mut body);
    encode_varint(inner.len() as u64, &mut body);
    body.extend_from_slice(&inner);
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The sender's incarnation in the encoded frame `bytes` (without the
/// length prefix), or 0 when it is not a hello or does not say.
pub fn incarnation_of(bytes: &[u8]) -> u64 {
    MeshHelloFrame::decode(bytes)
        .ok()
        .and_then(|f| f.hello)
        .map_or(0, |h| h.incarnation)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<usize, FrameError> {
    let bytes = encode_frame(frame)?;
    w.write_all(&bytes).await?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ocmesh_proto::federation::{Hello, frame::Kind};
    use proptest::prelude::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        /// Any bytes on the sync stream: frames, a clean end, or an error
        /// naming what was wrong; never a panic, and never a buffer larger
        /// than the bytes that arrived (plus one read step).
        #[test]
        fn any_stream_reads_as_frames_or_an_error(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..48), 0..4),
            claimed in prop_oneof![Just(None), Just(Some(u32::MAX)), Just(Some(MAX_FRAME_BYTES as u32)), any::<u32>().prop_map(Some)],
            tail in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut bytes = Vec::new();
            for f in &frames {
                bytes.extend((f.len() as u32).to_le_bytes());
                bytes.extend(f);
            }
            if let Some(n) = claimed {
                bytes.extend(n.to_le_bytes());
            }
            bytes.extend(&tail);
            let total = bytes.len();
            let mut r = bytes.as_slice();
            let mut buf = Vec::new();
            block_on(async {
                for _ in 0..frames.len() + 2 {
                    match read_frame(&mut r, &mut buf).await {
                        Ok(Some(f)) => {
                            // What decoded encodes again.
                            prop_assert!(encode_frame(&f).is_ok());
                        }
                        Ok(None) | Err(_) => break,
                    }
                    prop_assert!(buf.capacity() <= total + READ_STEP);
                }
                prop_assert!(buf.capacity() <= total + READ_STEP);
                Ok(())
            })?;
            // Whatever the bytes, the incarnation reads as a number.
            let _ = incarnation_of(&bytes);
        }

        /// Every frame the encoder makes reads back as itself.
        #[test]
        fn encoded_frames_round_trip(protocol_version in any::<u32>(), incarnation in any::<u64>(), seqs in proptest::collection::vec(("[a-z]{1,4}", any::<u64>()), 0..6)) {
            let have = ocmesh_proto::federation::VersionVector {
                entries: seqs.into_iter().map(|(origin, seq)| ocmesh_proto::federation::OriginSeq { origin, seq }).collect(),
            };
            let h = Hello { protocol_version, have: Some(have), withheld: Vec::new() };
            let bytes = encode_hello_frame(&h, incarnation).expect("encode");
            let mut r = bytes.as_slice();
            let mut buf = Vec::new();
            let got = block_on(read_frame(&mut r, &mut buf)).expect("read");
            prop_assert_eq!(got, Some(Frame { kind: Some(Kind::Hello(h)) }));
            prop_assert_eq!(incarnation_of(&buf), incarnation);
        }
    }

    #[tokio::test]
    async fn a_claimed_length_costs_only_the_bytes_that_arrive() {
        let mut bytes = (MAX_FRAME_BYTES as u32).to_le_bytes().to_vec();
        bytes.extend([0u8; 10]);
        let mut r = bytes.as_slice();
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut r, &mut buf).await,
            Err(FrameError::Truncated {
                got: 10,
                want: MAX_FRAME_BYTES
            })
        ));
        assert!(buf.capacity() <= READ_STEP, "{} bytes allocated", buf.capacity());
    }

    fn hello() -> Frame {
        Frame {
            kind: Some(Kind::Hello(Hello {
                protocol_version: 1,
                have: None,
                withheld: Vec::new(),
            })),
        }
    }

    #[tokio::test]
    async fn round_trip_and_clean_end() {
        let mut bytes = encode_frame(&hello()).expect("encode");
        bytes.extend(encode_frame(&hello()).expect("encode"));
        let mut r = bytes.as_slice();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).await.expect("1"), Some(hello()));
        assert_eq!(read_frame(&mut r, &mut buf).await.expect("2"), Some(hello()));
        assert_eq!(read_frame(&mut r, &mut buf).await.expect("end"), None);
    }

    #[tokio::test]
    async fn a_hello_carries_the_incarnation_and_stays_a_hello() {
        let Some(Kind::Hello(h)) = hello().kind else {
            panic!("not a hello")
        };
        let bytes = encode_hello_frame(&h, 1_764_000_000_123_456).expect("encode");
        let mut r = bytes.as_slice();
        let mut buf = Vec::new();
        // A peer that knows nothing of the incarnation reads the same hello.
        assert_eq!(read_frame(&mut r, &mut buf).await.expect("read"), Some(hello()));
        assert_eq!(incarnation_of(&buf), 1_764_000_000_123_456);
        // A plain hello (an older peer) says 0; so does a frame that is not a hello.
        let plain = encode_frame(&hello()).expect("encode");
        assert_eq!(incarnation_of(&plain[4..]), 0);
        let ack = Frame {
            kind: Some(Kind::Ack(ocmesh_proto::federation::Ack { batch: 7, have: None })),
        };
        assert_eq!(incarnation_of(&encode_frame(&ack).expect("encode")[4..]), 0);
        assert_eq!(incarnation_of(&[0xff, 0xff]), 0);
    }

    #[tokio::test]
    async fn bad_frames_are_errors() {
        let mut buf = Vec::new();
        let full = encode_frame(&hello()).expect("encode");
        let mut r = &full[..full.len() - 1];
        assert!(matches!(
            read_frame(&mut r, &mut buf).await,
            Err(FrameError::Truncated { .. })
        ));
        let mut r = &[1u8, 0][..];
        assert!(matches!(
            read_frame(&mut r, &mut buf).await,
            Err(FrameError::Truncated { got: 2, want: 4 })
        ));
        let big = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        let mut r = &big[..];
        assert!(matches!(
            read_frame(&mut r, &mut buf).await,
            Err(FrameError::TooLarge(_))
        ));
        let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        let mut r = &garbage[..];
        assert!(matches!(read_frame(&mut r, &mut buf).await, Err(FrameError::Decode(_))));
    }
}
