//! Reading a node's Prometheus text.

use std::net::SocketAddr;

/// Sum of every sample of `name` whose labels include all of `labels`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let matches = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
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
    }
}
