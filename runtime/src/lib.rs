//! Process glue shared by xpyd's roles: shutdown, gRPC health and reflection, the metrics
//! exporter and every cluster metric name, and the worker side of membership (a lease in
//! the embedded registry or in etcd), and KV pools in shared memory for placed transfers.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod ema;
pub mod env;
pub mod events;
pub mod grpc;
pub mod http;
pub mod kv_pool;
pub mod lease;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod plane;
pub mod shutdown;
pub mod tls;
pub mod worker;

pub use lease::{LeaseConfig, RegistryBackend, WorkerRecord};
pub use shutdown::CancellationToken;
