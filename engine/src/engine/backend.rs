//! What computes the engine's forward passes: the real model or the mock. Everything
//! else in the engine (KV cache, prefix cache, export/import, sampling) is shared.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv::KvStore;
use crate::mock::MockModel;
use crate::model::{Model, Pass};

/// The compute backend of an [`super::Engine`].
pub(super) enum Backend {
    /// The candle Llama forward pass.
    Real(Model),
    /// Deterministic KV and tokens with a simulated latency.
    Mock(MockModel),
}

impl Backend {
    /// The model's geometry.
    pub(super) fn config(&self) -> &ModelConfig {
        match self {
            Backend::Real(m) => m.config(),
            Backend::Mock(m) => m.config(),
        }
    }

    /// How long a whole decode step takes with the mock (forward, sampling and
    /// bookkeeping: what `xpyd bench profile` times on the real model); `None` for the
    /// real model, which takes what it takes.
    pub(super) fn decode_pace(&self, pass: &Pass<'_>) -> Option<std::time::Duration> {
        match self {
            Backend::Real(_) => None,
            Backend::Mock(m) => Some(m.latency().of(pass)),
        }
    }

    /// One forward pass; see [`Model::forward`].
    pub(super) fn forward(
        &self,
        pass: &Pass<'_>,
        kv: &mut KvStore,
        on_layer: &mut dyn FnMut(usize, &KvStore),
    ) -> Result<Vec<Vec<f32>>> {
        match self {
            Backend::Real(m) => m.forward(pass, kv, on_layer),
            Backend::Mock(m) => m.forward(pass, kv, on_layer),
        }
    }
}
