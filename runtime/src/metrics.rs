//! Every cluster metric name (`xpyd_{component}_{name}_{unit}`) and the Prometheus
//! exporter with its histogram buckets, set once here.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Coordinator: requests by `api` and `code` (HTTP status, or gRPC code name).
pub const COORD_REQUESTS_TOTAL: &str = "xpyd_coordinator_requests_total";
/// Coordinator: client connections (requests) open now.
pub const COORD_CONNECTIONS: &str = "xpyd_coordinator_connections";
/// Coordinator: time to first token.
pub const COORD_TTFT_SECONDS: &str = "xpyd_coordinator_ttft_seconds";
/// Coordinator: per-token latency after the first token (mean gap per request).
pub const COORD_TPOT_SECONDS: &str = "xpyd_coordinator_tpot_seconds";
/// Coordinator: every gap between two output tokens.
pub const COORD_TOKEN_LATENCY_SECONDS: &str = "xpyd_coordinator_token_latency_seconds";
/// Coordinator: request latency, first byte in to last byte out.
pub const COORD_E2E_SECONDS: &str = "xpyd_coordinator_e2e_seconds";
/// Coordinator: prompt tokens per request.
pub const COORD_INPUT_TOKENS: &str = "xpyd_coordinator_input_tokens";
/// Coordinator: output tokens per request.
pub const COORD_OUTPUT_TOKENS: &str = "xpyd_coordinator_output_tokens";
/// Coordinator: requests waiting for a worker, by `class`.
pub const COORD_QUEUE_DEPTH: &str = "xpyd_coordinator_queue_depth";
/// Coordinator: requests retried on another worker pair, by `reason`.
pub const COORD_RETRIES_TOTAL: &str = "xpyd_coordinator_retries_total";
/// Coordinator: requests sent to another worker pair after tokens went out (migrations), by `reason`.
pub const COORD_MIGRATIONS_TOTAL: &str = "xpyd_coordinator_migrations_total";
/// Coordinator: clients cut off because they stopped reading their stream.
pub const COORD_STALLED_CLIENTS_TOTAL: &str = "xpyd_coordinator_stalled_clients_total";
/// Advisor: replicas per `role` of the `split` running (`current`) and advised (`recommended`).
pub const ADVISOR_REPLICAS: &str = "xpyd_advisor_replicas";
/// Advisor: predicted TTFT p90 at the forecast rate, by `split` (`current`, `recommended`).
pub const ADVISOR_PREDICTED_TTFT_P90_SECONDS: &str = "xpyd_advisor_predicted_ttft_p90_seconds";
/// Advisor: predicted TPOT p90 at the forecast rate, by `split`.
pub const ADVISOR_PREDICTED_TPOT_P90_SECONDS: &str = "xpyd_advisor_predicted_tpot_p90_seconds";
/// Coordinator: workers by `role` and `state`.
pub const COORD_WORKERS: &str = "xpyd_coordinator_workers";
/// Coordinator: KV bytes prefill workers reported moving to decode workers, by `source`,
/// `target` (worker ids) and `backend`.
pub const COORD_KV_BYTES_TOTAL: &str = "xpyd_coordinator_kv_transfer_bytes_total";
/// Coordinator: microseconds those transfers took (open to commit), same labels: with
/// the bytes, the bandwidth of each link.
pub const COORD_KV_MICROS_TOTAL: &str = "xpyd_coordinator_kv_transfer_microseconds_total";
/// Histogram: seconds each request's KV transfer took, from open to commit, labelled by
/// link (`source`, `target`, `backend`).
pub const COORD_KV_SECONDS: &str = "xpyd_coordinator_kv_transfer_seconds";
/// Coordinator: requests waiting on workers, by `role` (their reported queues).
pub const ROLE_QUEUE_DEPTH: &str = "xpyd_role_queue_depth";
/// Coordinator: KV blocks of the workers of a `role`, by `state` (`used`, `free`).
pub const ROLE_KV_BLOCKS: &str = "xpyd_role_kv_blocks";
/// Coordinator: share of prompt tokens served from prefix caches over the last 10 s.
pub const COORD_PREFIX_CACHE_HIT_RATIO: &str = "xpyd_coordinator_prefix_cache_hit_ratio";
/// Every process: CPU seconds used (user + system), from `/proc/self/stat`.
pub const PROCESS_CPU_SECONDS_TOTAL: &str = "process_cpu_seconds_total";
/// Every process: resident memory, bytes, from `/proc/self/statm`.
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";

// The managed product's names (coordinator; labels `service_name`, `group_id`,
// `instance_name`; latencies in milliseconds).
/// Calls answered, by `code`, `method` and `path`.
pub const INFER_REQUEST_TOTAL: &str = "infer_service_request_total";
/// Requests being served now.
pub const INFER_REQUEST_CONNECT_COUNT: &str = "infer_service_request_connect_count";
/// Output tokens served.
pub const INFER_TOKEN_COUNT: &str = "infer_service_token_count";
/// Time to first token over the last minute: avg, min, max (ms).
pub const INFER_FIRST_TOKEN_AMM: [&str; 3] = [
    "infer_service_first_token_avg_cost",
    "infer_service_first_token_min_cost",
    "infer_service_first_token_max_cost",
];
/// Time per output token after the first over the last minute: avg, min, max (ms).
pub const INFER_PER_TOKEN_AMM: [&str; 3] = [
    "infer_service_per_token_avg_cost",
    "infer_service_per_token_min_cost",
    "infer_service_per_token_max_cost",
];
/// End-to-end time per output token over the last minute: avg, min, max (ms).
pub const INFER_TOKEN_LATENCY_AMM: [&str; 3] = [
    "infer_service_token_latency_avg_cost",
    "infer_service_token_latency_min_cost",
    "infer_service_token_latency_max_cost",
];
/// End-to-end time of a served request (histogram, ms).
pub const INFER_REQUEST_COST: &str = "infer_service_request_cost";
/// Time to first token (histogram, ms).
pub const INFER_FIRST_TOKEN_COST: &str = "infer_service_first_token_cost";
/// Time per output token after the first (histogram, ms).
pub const INFER_PER_TOKEN_COST: &str = "infer_service_per_token_cost";
/// Prompt tokens per served request (histogram).
pub const INFER_INPUT_TOKEN_QUANTITY: &str = "infer_service_input_token_quantity";
/// Output tokens per served request (histogram).
pub const INFER_OUTPUT_TOKEN_QUANTITY: &str = "infer_service_output_token_quantity";

/// Coordinator: requests refused for overload, by `reason`.
pub const COORD_REJECTED_TOTAL: &str = "xpyd_coordinator_rejected_total";

/// Worker: requests waiting, by `role`.
pub const WORKER_QUEUE_DEPTH: &str = "xpyd_worker_queue_depth";
/// Worker: requests running, by `role`.
pub const WORKER_RUNNING: &str = "xpyd_worker_running";
/// Worker: KV blocks in use.
pub const WORKER_KV_BLOCKS_USED: &str = "xpyd_worker_kv_blocks_used";
/// Worker: KV blocks free.
pub const WORKER_KV_BLOCKS_FREE: &str = "xpyd_worker_kv_blocks_free";
/// Worker: requests by `role` and `outcome` (ok, cancelled, error).
pub const WORKER_REQUESTS_TOTAL: &str = "xpyd_worker_requests_total";
/// Prefill worker: prompt prefill time (compute and streaming) per request.
pub const WORKER_PREFILL_SECONDS: &str = "xpyd_worker_prefill_seconds";
/// Decode worker: one batched decode step.
pub const WORKER_DECODE_STEP_SECONDS: &str = "xpyd_worker_decode_step_seconds";
/// Decode worker: sequences in a decode step.
pub const WORKER_DECODE_BATCH: &str = "xpyd_worker_decode_batch";
/// Prefill worker: share of looked-up prompt tokens found in the prefix cache.
pub const WORKER_PREFIX_CACHE_HIT_RATIO: &str = "xpyd_worker_prefix_cache_hit_ratio";
/// Worker: time a role flip took, drain included (histogram, label `to`).
pub const WORKER_ROLE_FLIP_SECONDS: &str = "xpyd_worker_role_flip_seconds";
/// Worker: 1 for the role it serves now (label `role`), 0 for the others.
pub const WORKER_ROLE: &str = "xpyd_worker_role";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const MS_BUCKETS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same
/// handle) and returns the handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), TOKEN_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch".into()), TOKEN_BUCKETS)
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_cost".into()), MS_BUCKETS))
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_quantity".into()), TOKEN_BUCKETS)
                })
                .expect("bucket lists are non-empty constants");
            match builder.install_recorder() {
                Ok(h) => h,
                // Another recorder is installed (tests running roles in one process): render
                // from a private one rather than fail.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Sets the process gauges ([`PROCESS_CPU_SECONDS_TOTAL`],
/// [`PROCESS_RESIDENT_MEMORY_BYTES`]) from `/proc/self` (Linux; elsewhere nothing is
/// set). Call it before rendering `/metrics`.
pub fn sample_process() {
    if let Some((cpu, rss)) = read_process() {
        metrics::gauge!(PROCESS_CPU_SECONDS_TOTAL).set(cpu);
        metrics::gauge!(PROCESS_RESIDENT_MEMORY_BYTES).set(rss);
    }
}

/// (CPU seconds, resident bytes) of this process.
fn read_process() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    parse_proc(&stat, &statm, CLOCK_TICKS, PAGE_BYTES)
}

/// Linux's USER_HZ and page size on every platform xpyd runs on (x86_64, aarch64).
const CLOCK_TICKS: f64 = 100.0;
const PAGE_BYTES: f64 = 4096.0;

/// `utime + stime` (fields 14 and 15 of `stat`, counted after the command name, which
/// may hold spaces) and resident pages (field 2 of `statm`).
fn parse_proc(stat: &str, statm: &str, ticks: f64, page: f64) -> Option<(f64, f64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let rss: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(((utime + stime) / ticks, rss * page))
}

#[cfg(test)]
mod process_tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_past_a_command_with_spaces() {
        let stat = "4242 (xpyd worker) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 3 0 100 1000 300";
        assert_eq!(
            parse_proc(stat, "1000 300 20 1 0 50 0", 100.0, 4096.0),
            Some((3.0, 300.0 * 4096.0))
        );
        assert_eq!(parse_proc("garbage", "", 100.0, 4096.0), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_memory_and_time() {
        let (cpu, rss) = read_process().unwrap();
        assert!(cpu >= 0.0 && rss > 1e6, "{cpu} {rss}");
    }
}
