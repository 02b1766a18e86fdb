//! grpc.health.v1 probes of a node.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Whether the node at `addr` answers SERVING within a second.
pub async fn serving(addr: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else { return false };
    let probe = async {
        let channel = endpoint.connect_timeout(Duration::from_millis(500)).connect().await.ok()?;
        let response = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(response.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Some(true)))
}
