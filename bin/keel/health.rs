//! grpc.health.v1 probes of a node.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Whether the node at `addr` answers SERVING within a second (over TLS when `tls` is set).
pub async fn serving(addr: &str, tls: Option<&tonic::transport::ClientTlsConfig>) -> bool {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let Ok(mut endpoint) = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}")) else { return false };
    if let Some(tls) = tls {
        let Ok(with_tls) = endpoint.tls_config(tls.clone()) else { return false };
        endpoint = with_tls;
    }
    let probe = async {
        let channel = endpoint.connect_timeout(Duration::from_millis(500)).connect().await.ok()?;
        let response = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(response.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Some(true)))
}
