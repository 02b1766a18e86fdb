//! One `ProduceStream` per leader address: pipelined requests out, answers matched back to them
//! by request id.
//!
//! A stream with a request unanswered for `request_timeout` is torn down, with every request on
//! it failed as retriable and the cached channel dropped: on a network that never retransmits
//! (the simulation, or a half-dead TCP connection) a stalled stream never recovers by itself.

use std::collections::BTreeMap;
use std::sync::Arc;

use keel_proto::v1 as pb;
use keel_proto::v1::producer_client::ProducerClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::core::{Core, MESSAGE_BYTES_MAX};
use crate::error::ClientError;

/// What the sender task hears from streams and from metadata refreshes.
#[derive(Debug)]
pub(crate) enum Event {
    /// A request sent to `addr` was answered, or failed with its stream.
    Answered { addr: String, request_id: u64, result: Result<pb::ProduceResponse, ClientError> },
    /// The stream `id` to `addr` ended; a new one is started on the next send.
    StreamClosed { addr: String, id: u64 },
    /// A metadata refresh finished.
    Refreshed(Result<(), ClientError>),
    /// An InitProducerId call finished: the id and epoch.
    ProducerId(Result<(i64, i16), ClientError>),
}

/// The sender task's end of a stream.
pub(crate) struct StreamHandle {
    pub(crate) id: u64,
    pub(crate) tx: mpsc::UnboundedSender<pb::ProduceRequest>,
}

/// Starts a stream to `addr`; it dials on the first request.
///
/// The request queue is unbounded because the sender task bounds what it puts in: at most
/// `in_flight_max` requests per partition.
pub(crate) fn start(core: Arc<Core>, addr: String, id: u64, events: mpsc::UnboundedSender<Event>) -> StreamHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(core, addr, id, rx, events));
    StreamHandle { id, tx }
}

async fn run(
    core: Arc<Core>,
    addr: String,
    id: u64,
    mut outgoing: mpsc::UnboundedReceiver<pb::ProduceRequest>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut pending: BTreeMap<u64, Instant> = BTreeMap::new();
    let error = serve(&core, &addr, &mut outgoing, &events, &mut pending).await;
    // Closing first makes every later send fail, so no request can slip in unanswered.
    outgoing.close();
    while let Ok(request) = outgoing.try_recv() {
        pending.insert(request.request_id, Instant::now());
    }
    if error != ClientError::Closed {
        debug!(addr, id, pending = pending.len(), %error, "produce stream failed");
    }
    if error.breaks_connection() {
        core.drop_channel(&addr);
    }
    // In request-id order, so that a partition's batches are re-queued in their order.
    for request_id in pending.into_keys() {
        let _ = events.send(Event::Answered { addr: addr.clone(), request_id, result: Err(error.clone()) });
    }
    let _ = events.send(Event::StreamClosed { addr, id });
}

/// Runs the stream until it fails; returns why.
async fn serve(
    core: &Core,
    addr: &str,
    outgoing: &mut mpsc::UnboundedReceiver<pb::ProduceRequest>,
    events: &mpsc::UnboundedSender<Event>,
    pending: &mut BTreeMap<u64, Instant>,
) -> ClientError {
    let timeout = core.config.request_timeout;
    let channel = match core.channel(addr) {
        Ok(channel) => channel,
        Err(e) => return e,
    };
    let mut client = ProducerClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let (requests, requests_rx) = mpsc::unbounded_channel::<pb::ProduceRequest>();
    let outbound = futures_util::stream::unfold(requests_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let forward = |request: pb::ProduceRequest, pending: &mut BTreeMap<u64, Instant>| {
        pending.insert(request.request_id, Instant::now() + timeout);
        requests.send(request).is_ok()
    };
    let opened_by = Instant::now() + timeout;
    let call = client.produce_stream(outbound);
    tokio::pin!(call);
    // Requests are forwarded while the call opens: a broker may wait for the first request
    // before it answers with headers.
    let mut inbound = loop {
        let deadline = pending.values().next().copied().unwrap_or(opened_by).min(opened_by);
        tokio::select! {
            biased;
            opened = &mut call => match opened {
                Ok(response) => break response.into_inner(),
                Err(status) => return ClientError::from(status),
            },
            request = outgoing.recv() => match request {
                Some(request) => {
                    if !forward(request, pending) {
                        return ClientError::Transport(format!("{addr}: produce stream closed"));
                    }
                }
                None => return ClientError::Closed,
            },
            () = tokio::time::sleep_until(deadline) => {
                return ClientError::timeout(format!("opening a produce stream to {addr}"), timeout);
            }
        }
    };
    loop {
        // Request ids grow and every request gets the same timeout: the first is the oldest.
        let deadline = pending.values().next().copied();
        tokio::select! {
            biased;
            message = inbound.message() => match message {
                Ok(Some(response)) => {
                    if pending.remove(&response.request_id).is_some() {
                        let request_id = response.request_id;
                        let addr = addr.to_owned();
                        let _ = events.send(Event::Answered { addr, request_id, result: Ok(response) });
                    } else {
                        warn!(addr, request_id = response.request_id, "answer to an unknown produce request");
                    }
                }
                Ok(None) => return ClientError::Transport(format!("{addr} ended the produce stream")),
                Err(status) => return ClientError::from(status),
            },
            request = outgoing.recv() => match request {
                Some(request) => {
                    if !forward(request, pending) {
                        return ClientError::Transport(format!("{addr}: produce stream closed"));
                    }
                }
                None => return ClientError::Closed,
            },
            () = tokio::time::sleep_until(deadline.unwrap_or(opened_by)), if deadline.is_some() => {
                return ClientError::timeout(format!("produce answer from {addr}"), timeout);
            }
        }
    }
}
