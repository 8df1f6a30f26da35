//! Finding the fields of a declared spec the controller does not read. Istio kinds are parsed
//! into our own structs, which name only what we implement; a field they do not name must be
//! reported (never silently dropped), so each spec is also compared, path by path, with what
//! its typed form serializes back to: every key of the raw spec missing there is a field we
//! do not implement. The CRDs preserve such fields, so they stay on the object as written.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Paths (`spec.http[0].corsPolicy`) of the keys of `raw` that `known` does not have.
/// Arrays are compared element by element; a key's value is only compared further when both
/// sides hold it.
pub(crate) fn unknown_paths(raw: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
    match (raw, known) {
        (Value::Object(raw), Value::Object(known)) => {
            for (key, value) in raw {
                let here = format!("{path}.{key}");
                match known.get(key) {
                    Some(k) => unknown_paths(value, k, &here, out),
                    None => out.push(here),
                }
            }
        }
        (Value::Array(raw), Value::Array(known)) => {
            for (i, (r, k)) in raw.iter().zip(known).enumerate() {
                unknown_paths(r, k, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Parses a spec (`null` or absent: the default) and lists the fields it has that `S` does
/// not implement, as paths under `spec`.
pub(crate) fn typed_spec<S: DeserializeOwned + Serialize + Default>(
    raw: Value,
) -> Result<(S, Vec<String>), serde_json::Error> {
    if raw.is_null() {
        return Ok((S::default(), Vec::new()));
    }
    let spec: S = serde_json::from_value(raw.clone())?;
    let known = serde_json::to_value(&spec)?;
    let mut unknown = Vec::new();
    unknown_paths(&raw, &known, "spec", &mut unknown);
    Ok((spec, unknown))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reports_each_unknown_key_by_path() {
        let raw = json!({"a": 1, "b": [{"c": 1, "d": 2}, {"e": {"f": 1}}], "g": {"h": 1}});
        let known = json!({"a": 1, "b": [{"c": 1}, {"e": {}}], "g": null});
        let mut out = Vec::new();
        unknown_paths(&raw, &known, "spec", &mut out);
        assert_eq!(out, vec!["spec.b[0].d", "spec.b[1].e.f"]);
    }
}
