//! Reads the performance profile `xpyd bench profile` writes (JSON, `"kind":
//! "xpyd-performance-profile"`, version [`PROFILE_VERSION`]) into a [`ServiceModel`].
//! Every refusal names the field.

use crate::PlanError;
use crate::service::{FitErrors, ServiceModel};
use serde_json::Value;

/// The profile layout this reads; bumped when a field changes meaning. Version 2: the
/// decode points give each sequence of a batch KV blocks of its own (version 1 shared
/// one prompt's blocks through the prefix cache, and its batch × context cost was a
/// third of a serving batch's).
pub const PROFILE_VERSION: u64 = 2;

/// The fit of `v` (`{"model": {"kind", "coeffs"}, "fit_error": {"mean_abs_rel"}}`) as
/// coefficients of `kind` with `len` of them, and its mean relative error.
fn fit(v: &Value, field: &str, kind: &str, len: usize) -> Result<(Vec<f64>, f64), PlanError> {
    let model = &v["model"];
    if model["kind"] != kind {
        return Err(PlanError::invalid(
            format!("{field}.model.kind"),
            format!("expected `{kind}`, found {}", model["kind"]),
        ));
    }
    let coeffs: Vec<f64> = model["coeffs"]
        .as_array()
        .ok_or_else(|| PlanError::invalid(format!("{field}.model.coeffs"), "missing"))?
        .iter()
        .map(Value::as_f64)
        .collect::<Option<Vec<f64>>>()
        .ok_or_else(|| PlanError::invalid(format!("{field}.model.coeffs"), "not all numbers"))?;
    if coeffs.is_empty() || coeffs.len() > len {
        return Err(PlanError::invalid(
            format!("{field}.model.coeffs"),
            format!("{} coefficients; expected 1..={len}", coeffs.len()),
        ));
    }
    let err = v["fit_error"]["mean_abs_rel"].as_f64().unwrap_or(f64::NAN);
    let mut c = coeffs;
    c.resize(len, 0.0);
    Ok((c, err))
}

/// Whether `v` is a profile of the kind and version this reads (the rest is checked by
/// [`service_model`]): a profile of another version was measured another way.
///
/// # Errors
/// [`PlanError::Invalid`] naming `kind` or `version`.
pub fn check_layout(v: &Value) -> Result<(), PlanError> {
    if v["kind"] != "xpyd-performance-profile" {
        return Err(PlanError::invalid(
            "kind",
            format!(
                "{} is not `xpyd-performance-profile` (write one with `xpyd bench profile`)",
                v["kind"]
            ),
        ));
    }
    if v["version"].as_u64() != Some(PROFILE_VERSION) {
        return Err(PlanError::invalid(
            "version",
            format!(
                "{} is not {PROFILE_VERSION}; profile again with this xpyd",
                v["version"]
            ),
        ));
    }
    Ok(())
}

/// The service model of profile `text`, for prefill chunk size `chunk` (the fit of the
/// nearest chunk size the profile measured). A profile without a KV transfer section
/// gives free transfers.
///
/// # Errors
/// [`PlanError::Invalid`] naming the field: not JSON, another kind or version, a
/// missing or malformed fit, impossible numbers.
pub fn service_model(text: &str, chunk: u32) -> Result<ServiceModel, PlanError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| PlanError::invalid("profile", format!("not JSON: {e}")))?;
    check_layout(&v)?;
    let by_chunk = v["prefill"]["fit_by_chunk"]
        .as_object()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| PlanError::invalid("prefill.fit_by_chunk", "missing or empty"))?;
    let mut chunks: Vec<(u32, &Value)> = Vec::new();
    for (k, f) in by_chunk {
        let c: u32 = k.parse().map_err(|_| {
            PlanError::invalid("prefill.fit_by_chunk", format!("`{k}` is not a chunk size"))
        })?;
        chunks.push((c, f));
    }
    let (measured, f) = chunks
        .into_iter()
        .min_by_key(|(c, _)| (c.abs_diff(chunk), *c))
        .expect("non-empty");
    let (p, prefill_err) = fit(
        f,
        &format!("prefill.fit_by_chunk.{measured}"),
        "polynomial",
        3,
    )?;
    let (d, decode_err) = fit(&v["decode_step"]["fit"], "decode_step.fit", "bilinear", 4)?;
    let kv = &v["kv_transfer"];
    let (latency, per_byte, transfer_err) = if kv.is_null() {
        (0.0, 0.0, 0.0)
    } else {
        let (t, e) = fit(&kv["fit"], "kv_transfer.fit", "polynomial", 2)?;
        (t[0].max(0.0), t[1], e)
    };
    let model = &v["model"];
    let num = |key: &str, default: f64| model[key].as_f64().unwrap_or(default);
    let m = ServiceModel {
        prefill: [p[0], p[1], p[2]],
        chunk: measured,
        decode: [d[0], d[1], d[2], d[3]],
        transfer_latency_s: latency,
        transfer_bytes_per_s: if per_byte > 0.0 {
            1.0 / per_byte
        } else {
            f64::INFINITY
        },
        kv_bytes_per_token: num("kv_bytes_per_token", 0.0),
        layers: num("layers", 1.0) as u32,
        errors: FitErrors {
            prefill: prefill_err,
            decode: decode_err,
            transfer: transfer_err,
        },
    };
    m.validate()?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile() -> Value {
        json!({
            "version": PROFILE_VERSION, "kind": "xpyd-performance-profile",
            "model": {"kv_bytes_per_token": 23040, "layers": 30},
            "prefill": {"fit_by_chunk": {
                "256": {"model": {"kind": "polynomial", "coeffs": [0.005, 0.0005, 1e-8]},
                        "fit_error": {"r2": 0.99, "mean_abs_rel": 0.02, "max_abs_rel": 0.05}},
                "512": {"model": {"kind": "polynomial", "coeffs": [0.004, 0.0004, 2e-8]},
                        "fit_error": {"r2": 0.99, "mean_abs_rel": 0.03, "max_abs_rel": 0.06}}}},
            "decode_step": {"fit": {"model": {"kind": "bilinear", "coeffs": [0.012, 0.001, 1e-6, 2e-7]},
                                    "fit_error": {"r2": 0.98, "mean_abs_rel": 0.04, "max_abs_rel": 0.1}}},
            "kv_transfer": {"backend": "tcp", "fit": {"model": {"kind": "polynomial", "coeffs": [0.001, 5e-10]},
                                                      "fit_error": {"r2": 1.0, "mean_abs_rel": 0.01, "max_abs_rel": 0.02}}}
        })
    }

    #[test]
    fn a_profile_reads_into_a_model() {
        let m = service_model(&profile().to_string(), 500).unwrap();
        assert_eq!(m.chunk, 512);
        assert_eq!(m.prefill, [0.004, 0.0004, 2e-8]);
        assert_eq!(m.decode, [0.012, 0.001, 1e-6, 2e-7]);
        assert!((m.transfer_bytes_per_s - 2e9).abs() < 1.0);
        assert_eq!((m.layers, m.kv_bytes_per_token), (30, 23040.0));
        assert_eq!(
            (m.errors.prefill, m.errors.decode, m.errors.transfer),
            (0.03, 0.04, 0.01)
        );
        assert_eq!(
            service_model(&profile().to_string(), 100).unwrap().chunk,
            256
        );
        let mut p = profile();
        p["kv_transfer"] = Value::Null;
        assert!(
            service_model(&p.to_string(), 512)
                .unwrap()
                .transfer_bytes_per_s
                .is_infinite()
        );
    }

    #[test]
    fn malformed_profiles_name_the_field() {
        let field = |v: Value| match service_model(&v.to_string(), 512) {
            Err(PlanError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let with = |f: &dyn Fn(&mut Value)| {
            let mut p = profile();
            f(&mut p);
            p
        };
        assert!(matches!(
            service_model("{", 512),
            Err(PlanError::Invalid { field, .. }) if field == "profile"
        ));
        assert_eq!(field(with(&|p| p["kind"] = json!("other"))), "kind");
        assert_eq!(
            field(with(&|p| p["version"] = json!(PROFILE_VERSION - 1))),
            "version"
        );
        assert_eq!(
            field(with(&|p| p["version"] = json!(PROFILE_VERSION + 1))),
            "version"
        );
        assert_eq!(
            field(with(&|p| p["prefill"]["fit_by_chunk"] = json!({}))),
            "prefill.fit_by_chunk"
        );
        assert_eq!(
            field(with(
                &|p| p["prefill"]["fit_by_chunk"]["512"]["model"]["coeffs"] = json!(["x"])
            )),
            "prefill.fit_by_chunk.512.model.coeffs"
        );
        assert_eq!(
            field(with(
                &|p| p["decode_step"]["fit"]["model"]["kind"] = json!("polynomial")
            )),
            "decode_step.fit.model.kind"
        );
        assert_eq!(
            field(with(
                &|p| p["decode_step"]["fit"]["model"]["coeffs"] = json!([0, 0, 0, 0])
            )),
            "decode"
        );
    }
}
