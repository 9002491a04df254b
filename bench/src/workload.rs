//! Workloads: the planner's (`xpyd_planner::workload`), which the simulator and the load
//! generator share, so a simulated run and a real one send the same requests.

pub use xpyd_planner::workload::*;

#[cfg(test)]
mod tests {
    /// The planner's generator and the engine's sampler use one SplitMix64.
    #[test]
    fn the_planner_and_the_engine_draw_the_same_numbers() {
        for z in [0, 1, 42, u64::MAX, 0x9E37_79B9_7F4A_7C15] {
            assert_eq!(super::splitmix64(z), xpyd_engine::sampling::splitmix64(z));
        }
    }
}
