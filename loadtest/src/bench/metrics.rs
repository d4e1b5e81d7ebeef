//! Reading a node's Prometheus text.

use std::{collections::BTreeMap, net::SocketAddr};

/// Samples of `name` whose labels include all of `labels`: (label text, value).
fn samples<'a>(
    text: &'a str,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| Some((rest, value.parse::<f64>().ok()?))).flatten()
        })
}

/// Sum of every sample of `name` whose labels include all of `labels`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name, labels).map(|(_, value)| value).sum()
}

/// Sums of `name` per value of `label`, over samples whose labels include
/// all of `labels`.
pub fn by_label(text: &str, name: &str, labels: &[(&str, &str)], label: &str) -> BTreeMap<String, f64> {
    let key = format!("{label}=\"");
    let mut sums = BTreeMap::new();
    for (rest, value) in samples(text, name, labels) {
        let Some(start) = rest.find(&key).map(|i| i + key.len()) else {
            continue;
        };
        let Some(end) = rest[start..].find('"') else { continue };
        *sums.entry(rest[start..start + end].to_owned()).or_default() += value;
    }
    sums
}

/// One scrape of `/metrics` at `addr`; empty when the node does not answer.
pub async fn scrape(addr: SocketAddr) -> String {
    fleetplane_testkit::fleet::scrape(addr).await.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_series_only() {
        let text = "# HELP x\n\
            fleetplane_gateway_messages_out_total{transport=\"websocket\",type=\"local_reply\"} 7\n\
            fleetplane_gateway_messages_out_total{transport=\"http\",type=\"local_reply\"} 3\n\
            fleetplane_gateway_messages_out_total{transport=\"websocket\",type=\"reply\"} 100\n\
            fleetplane_gateway_messages_out_total_other 5\n";
        let name = "fleetplane_gateway_messages_out_total";
        assert_eq!(sum(text, name, &[("type", "local_reply")]), 10.0);
        assert_eq!(sum(text, name, &[]), 110.0);
        assert_eq!(sum(text, "missing", &[]), 0.0);
        let by_type = by_label(text, name, &[("transport", "websocket")], "type");
        assert_eq!(by_type.get("local_reply"), Some(&7.0));
        assert_eq!(by_type.get("reply"), Some(&100.0));
        assert_eq!(by_type.len(), 2);
    }
}
