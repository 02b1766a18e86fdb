//! Every call gets a span naming it (method and request id: the caller's `x-request-id`, or
//! the node's own), and the service's spans (topic, partition) open inside it, so every log
//! line of a call can be followed. A process-wide subscriber records the spans opened.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::{channel, start};
use keel_proto::v1 as pb;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A span as opened: its name, its fields, and its parent's name.
#[derive(Debug, Clone)]
struct Opened {
    name: String,
    fields: String,
    parent: Option<String>,
}

#[derive(Default)]
struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

struct Recorder(Arc<Mutex<Vec<Opened>>>);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let parent = ctx.span(id).and_then(|s| s.parent()).map(|p| p.name().to_owned());
        self.0.lock().unwrap().push(Opened { name: attrs.metadata().name().to_owned(), fields: fields.0, parent });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_named_in_every_span_it_opens() {
    let opened = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Recorder(Arc::clone(&opened)));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let cluster = start(1).await;
    let mut producer = pb::producer_client::ProducerClient::new(channel(&cluster.addrs[0]).await);
    let produce = |id: Option<&str>| {
        let mut request = tonic::Request::new(pb::ProduceRequest {
            topic: "nowhere".into(),
            records: vec![pb::Record { value: Some(b"v".to_vec().into()), ..Default::default() }],
            ..Default::default()
        });
        if let Some(id) = id {
            request.metadata_mut().insert(keel_broker::REQUEST_ID_HEADER, id.parse().unwrap());
        }
        request
    };
    producer.produce(produce(Some("checkout-7f3a"))).await.unwrap_err();
    producer.produce(produce(None)).await.unwrap_err();
    producer.produce(produce(Some("has space"))).await.unwrap_err();

    let opened = opened.lock().unwrap().clone();
    let rpcs: Vec<&Opened> =
        opened.iter().filter(|s| s.name == "rpc" && s.fields.contains("/keel.v1.Producer/Produce")).collect();
    assert_eq!(rpcs.len(), 3, "{opened:#?}");
    assert!(rpcs[0].fields.contains("request_id=checkout-7f3a"), "{:?}", rpcs[0]);
    for own in &rpcs[1..] {
        assert!(own.fields.contains("request_id=n1-"), "the node names a call without a usable id: {own:?}");
    }
    let produce_spans: Vec<&Opened> = opened.iter().filter(|s| s.name == "produce").collect();
    assert!(!produce_spans.is_empty());
    for s in produce_spans {
        assert!(s.fields.contains("topic=nowhere") && s.fields.contains("partition=0"), "{s:?}");
        assert_eq!(s.parent.as_deref(), Some("rpc"), "the service's span opens inside the call's");
    }
}
