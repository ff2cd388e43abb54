//! Latency histograms: recording in nanoseconds, exact merging across threads and processes
//! (V2 serialization, then `add`), percentile summaries in microseconds, `.hgrm` files.

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Deserializer as SerdeDe, Serialize, Serializer as SerdeSer};
use std::io::{self, Write};

/// Highest trackable value: one hour in nanoseconds (larger values saturate).
const HIGH_NS: u64 = 3_600_000_000_000;

/// A latency histogram in nanoseconds, 3 significant digits.
#[derive(Clone, Debug)]
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

impl Hist {
    pub fn new() -> Hist {
        Hist(Histogram::new_with_bounds(1, HIGH_NS, 3).expect("valid histogram bounds"))
    }

    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1));
    }

    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Exact merge (counts added bucket by bucket; no averaging).
    pub fn merge(&mut self, other: &Hist) {
        self.0
            .add(&other.0)
            .expect("histograms with the same bounds always add");
    }

    /// V2 serialization (the HdrHistogram interchange format).
    pub fn to_v2(&self) -> Vec<u8> {
        let mut out = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut out)
            .expect("serializing into a Vec cannot fail");
        out
    }

    pub fn from_v2(bytes: &[u8]) -> Result<Hist, String> {
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut io::Cursor::new(bytes))
            .map_err(|e| format!("bad serialized histogram: {e:?}"))?;
        let mut out = Hist::new();
        out.0
            .add(&h)
            .map_err(|e| format!("serialized histogram out of range: {e:?}"))?;
        Ok(out)
    }

    pub fn summary(&self) -> Percentiles {
        let h = &self.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p95: us(h.value_at_quantile(0.95)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            p99_99: us(h.value_at_quantile(0.9999)),
            max: us(h.max()),
        }
    }

    /// Percentile distribution in the `.hgrm` text format of HdrHistogram's
    /// `outputPercentileDistribution` (values in microseconds), readable by the
    /// HdrHistogram plotter (hdrhistogram.github.io/HdrHistogram/plotFiles.html).
    pub fn write_hgrm(&self, w: &mut impl Write) -> io::Result<()> {
        let h = &self.0;
        writeln!(
            w,
            "{:>12} {:>14} {:>10} {:>14}\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        )?;
        let mut total = 0u64;
        if !h.is_empty() {
            for v in h.iter_quantiles(5) {
                total += v.count_since_last_iteration();
                let q = v.quantile_iterated_to();
                let value = v.value_iterated_to() as f64 / 1000.0;
                if q < 1.0 {
                    writeln!(
                        w,
                        "{value:12.3} {q:14.12} {total:10} {:14.2}",
                        1.0 / (1.0 - q)
                    )?;
                } else {
                    writeln!(w, "{value:12.3} {q:14.12} {total:10}")?;
                }
            }
        }
        let (mean, sd, max) = if h.is_empty() {
            (0.0, 0.0, 0.0)
        } else {
            (
                h.mean() / 1000.0,
                h.stdev() / 1000.0,
                h.max() as f64 / 1000.0,
            )
        };
        writeln!(w, "#[Mean    = {mean:12.3}, StdDeviation   = {sd:12.3}]")?;
        writeln!(
            w,
            "#[Max     = {max:12.3}, Total count    = {:12}]",
            h.len()
        )?;
        writeln!(
            w,
            "#[Buckets = {:12}, SubBuckets     = {:12}]",
            h.buckets(),
            h.distinct_values()
        )?;
        Ok(())
    }

    /// Points (1/(1-q), value in µs) of the percentile curve, for plotting.
    pub fn percentile_curve(&self) -> Vec<(f64, f64)> {
        let h = &self.0;
        if h.is_empty() {
            return Vec::new();
        }
        let mut pts = Vec::new();
        for v in h.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            if q >= 1.0 {
                break;
            }
            pts.push((1.0 / (1.0 - q), v.value_iterated_to() as f64 / 1000.0));
        }
        pts
    }
}

/// Travels inside JSON as hex of the V2 serialization.
impl Serialize for Hist {
    fn serialize<S: SerdeSer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex_encode(&self.to_v2()))
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: SerdeDe<'de>>(d: D) -> Result<Hist, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = hex_decode(&s).map_err(serde::de::Error::custom)?;
        Hist::from_v2(&bytes).map_err(serde::de::Error::custom)
    }
}

fn hex_encode(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 15) as usize] as char);
    }
    s
}

fn hex_decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return Err("odd hex length".into());
    }
    let nib = |c: u8| -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("bad hex digit {:?}", c as char)),
        }
    };
    b.chunks(2)
        .map(|p| Ok(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    #[serde(rename = "p99.99")]
    pub p99_99: f64,
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_across_processes_is_exact() {
        // Three "processes" record disjoint parts of one data set; the merge of their
        // serialized histograms must equal the histogram of the whole set.
        let mut whole = Hist::new();
        let mut parts = [Hist::new(), Hist::new(), Hist::new()];
        let mut x: u64 = 12345;
        for i in 0..30_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = 1_000 + (x >> 40) % 5_000_000 + if i % 1000 == 0 { 900_000_000 } else { 0 };
            whole.record(v);
            parts[(i % 3) as usize].record(v);
        }
        let json: Vec<String> = parts
            .iter()
            .map(|p| serde_json::to_string(p).unwrap())
            .collect();
        let mut merged = Hist::new();
        for j in &json {
            let h: Hist = serde_json::from_str(j).unwrap();
            merged.merge(&h);
        }
        assert_eq!(merged.0, whole.0);
        assert_eq!(merged.len(), 30_000);
        assert_eq!(merged.summary(), whole.summary());
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(merged.0.value_at_quantile(q), whole.0.value_at_quantile(q));
        }
        // Averaging the parts' p99 would not give this; the merge keeps the tail exactly.
        assert!(merged.summary().max >= 900_000.0);
    }

    #[test]
    fn summary_in_microseconds_and_hgrm() {
        let mut h = Hist::new();
        for v in 1..=1000u64 {
            h.record(v * 1000); // 1..1000 µs
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50 - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99 - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.max - 1000.0).abs() < 1.0, "{s:?}");
        let mut out = Vec::new();
        h.write_hgrm(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"));
        assert!(text.contains("#[Max     = "));
        let last_data = text
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.is_empty())
            .unwrap();
        assert!(
            last_data.contains(" 1000 ") || last_data.trim_end().ends_with("1000"),
            "{last_data}"
        );
        assert!(!h.percentile_curve().is_empty());
        // Empty histograms summarize to zeros and still give a valid file.
        assert_eq!(Hist::new().summary(), Percentiles::default());
        Hist::new().write_hgrm(&mut Vec::new()).unwrap();
    }

    #[test]
    fn hex_round_trip() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&b)).unwrap(), b);
        assert!(hex_decode("abc").is_err());
        assert!(hex_decode("zz").is_err());
    }
}
