//! The gRPC codec of taskq's services: prost messages, as with
//! `tonic_prost::ProstCodec`, but decoded from the message's bytes taken
//! whole.
//!
//! `ProstCodec` decodes straight from tonic's receive buffer, through a
//! `Buf` wrapper whose every read of a tag, a length or a number steps a
//! `BytesMut` and the wrapper's own count. Taking the message first as one
//! `Bytes` costs no copy (it is a split of the same buffer), and prost's
//! reads then step a plain slice. Decoding task and result batches was
//! the largest single cost of the stream bench's worker and readers.
//! Encoding reserves the message's size before writing it, so a batch
//! larger than the buffer grows it once rather than as it goes. The wire
//! format and the errors are `ProstCodec`'s.

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The codec the generated clients and servers use (`build.rs` names it).
#[derive(Debug, Clone)]
pub struct WireCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for WireCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = WireEncoder<T>;
    type Decoder = WireDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        WireEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder(PhantomData)
    }
}

/// Encodes one message into room reserved for all of it.
#[derive(Debug, Clone)]
pub struct WireEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for WireEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // What `Message::encode` does, less its check for room: an
        // `EncodeBuf` grows.
        buf.reserve(item.encoded_len());
        item.encode_raw(buf);
        Ok(())
    }
}

/// Decodes one message from its bytes taken whole.
#[derive(Debug, Clone)]
pub struct WireDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for WireDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let message = buf.copy_to_bytes(buf.remaining());
        U::decode(message)
            .map(Some)
            // As ProstCodec: a message that does not parse is INTERNAL
            // (https://github.com/grpc/grpc/blob/master/doc/statuscodes.md).
            .map_err(|error| Status::internal(error.to_string()))
    }
}
