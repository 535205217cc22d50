//! The synthetic cluster as both sources see it: manifest files for `--manifests`, and
//! JSON objects for the fake API server. Both are made from the same
//! [`testkit::manifests::ServiceSpec`] (a test checks that the YAML and the JSON say the
//! same thing), so the two sources feed the proxy the same objects.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use testkit::manifests::ServiceSpec;
use testkit::synth::{self, SynthService};

/// The node the proxy runs as (`--hostname-override`); synth's local endpoints name it.
pub const NODE: &str = "node-a";

/// This node's `Node`: an InternalIP, a zone and pod CIDRs, as a kubelet would register it.
pub fn node() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "z1"}},
        "spec": {"podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.100.1"}]},
    })
}

/// A Service and its EndpointSlices as the API server would hold them (one object per
/// document of [`ServiceSpec::to_yaml`], in that order).
pub fn spec_objects(spec: &ServiceSpec) -> Vec<Value> {
    let ips = |list: &[IpAddr]| {
        list.iter()
            .map(|ip| json!(ip.to_string()))
            .collect::<Vec<_>>()
    };
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({
                "name": p.name,
                "protocol": p.protocol,
                "port": p.port,
                "targetPort": p.target_port,
            });
            if let Some(np) = p.node_port {
                port["nodePort"] = json!(np);
            }
            port
        })
        .collect();
    let mut svc_spec =
        json!({"type": spec.type_, "clusterIPs": ips(&spec.cluster_ips), "ports": ports});
    if let Some(first) = spec.cluster_ips.first() {
        svc_spec["clusterIP"] = json!(first.to_string());
    }
    if !spec.external_ips.is_empty() {
        svc_spec["externalIPs"] = json!(ips(&spec.external_ips));
    }
    // `extra_spec` lines are `  key: value` (synth uses plain scalars only).
    for line in &spec.extra_spec {
        if let Some((key, value)) = line.trim().split_once(':') {
            svc_spec[key.trim()] = json!(value.trim());
        }
    }
    let mut service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": svc_spec,
    });
    if !spec.load_balancer_ips.is_empty() {
        let ingress: Vec<Value> = spec
            .load_balancer_ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect();
        service["status"] = json!({"loadBalancer": {"ingress": ingress}});
    }
    let mut out = vec![service];
    for (family, v4) in [("IPv4", true), ("IPv6", false)] {
        let endpoints: Vec<Value> = spec
            .endpoints
            .iter()
            .enumerate()
            .filter(|(_, (ip, _))| ip.is_ipv4() == v4)
            .map(|(i, (ip, ready))| {
                let mut ep = json!({"addresses": [ip.to_string()], "conditions": {"ready": ready}});
                if let Some(node) = spec.endpoint_nodes.get(i) {
                    ep["nodeName"] = json!(node);
                }
                ep
            })
            .collect();
        if endpoints.is_empty() {
            continue;
        }
        let slice_ports: Vec<Value> = spec
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "protocol": p.protocol, "port": p.target_port}))
            .collect();
        out.push(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-{}", spec.name, family.to_lowercase()),
                "namespace": spec.namespace,
                "labels": {"kubernetes.io/service-name": spec.name},
            },
            "addressType": family,
            "ports": slice_ports,
            "endpoints": endpoints,
        }));
    }
    out
}

/// The API objects of one synthetic Service (Service first, then its slice).
pub fn service_objects(s: &SynthService) -> Vec<Value> {
    spec_objects(&synth::spec(s))
}

/// The cluster as a manifests directory: `services-NN.yaml` files of `per_file` Services
/// each (the manifests source refuses files over 64 MiB: 50,000 Services × 10 endpoints
/// are about 100 MiB of YAML), plus `node.json`.
pub struct ManifestsDir {
    pub dir: PathBuf,
    per_file: usize,
}

impl ManifestsDir {
    pub fn create(dir: &Path, cluster: &[SynthService], per_file: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let me = ManifestsDir {
            dir: dir.to_path_buf(),
            per_file: per_file.max(1),
        };
        let node = serde_json::to_string_pretty(&node())?;
        std::fs::write(dir.join("node.json"), node).context("writing node.json")?;
        for (i, chunk) in cluster.chunks(me.per_file).enumerate() {
            let path = me.chunk_path(i);
            std::fs::write(&path, render(chunk))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(me)
    }

    fn chunk_path(&self, chunk: usize) -> PathBuf {
        self.dir.join(format!("services-{chunk:02}.yaml"))
    }

    /// Which file holds Service `index`, and the range of Services in it.
    pub fn chunk_of(&self, index: usize) -> (usize, std::ops::Range<usize>) {
        let chunk = index / self.per_file;
        (chunk, chunk * self.per_file..(chunk + 1) * self.per_file)
    }

    /// Writes the file of Service `index` again from `cluster` to a temporary name (which
    /// the proxy ignores: not `.yaml`), then returns a closure that renames it into place,
    /// so the caller can time the rename alone: that is the event the proxy can see.
    pub fn stage_chunk(&self, cluster: &[SynthService], index: usize) -> Result<Staged> {
        let (chunk, range) = self.chunk_of(index);
        let end = range.end.min(cluster.len());
        let start = range.start.min(end);
        let path = self.chunk_path(chunk);
        Staged::write(&path, &render(&cluster[start..end]))
    }

    /// A new file `added-N.yaml` holding one Service, staged under a temporary name.
    pub fn stage_added(&self, n: usize, s: &SynthService) -> Result<Staged> {
        let path = self.dir.join(format!("added-{n:04}.yaml"));
        Staged::write(&path, &synth::spec(s).to_yaml())
    }
}

fn render(services: &[SynthService]) -> String {
    let mut yaml = String::new();
    for s in services {
        yaml.push_str(&synth::spec(s).to_yaml());
    }
    yaml
}

/// A file written under a temporary name in its final directory, to be renamed into place.
pub struct Staged {
    temp: PathBuf,
    path: PathBuf,
}

impl Staged {
    fn write(path: &Path, content: &str) -> Result<Staged> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("manifest file name")?;
        let temp = path.with_file_name(format!(".{name}.tmp"));
        std::fs::write(&temp, content).with_context(|| format!("writing {}", temp.display()))?;
        Ok(Staged {
            temp,
            path: path.to_path_buf(),
        })
    }

    /// The rename: the file changes for readers at once.
    pub fn commit(self) -> Result<()> {
        std::fs::rename(&self.temp, &self.path)
            .with_context(|| format!("renaming {} into place", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON for the API server says what the YAML for the manifests source says.
    #[test]
    fn json_matches_yaml() {
        for s in synth::cluster(40, 1..=4) {
            let spec = synth::spec(&s);
            let from_yaml: Vec<Value> =
                serde_saphyr::from_multiple(&spec.to_yaml()).expect("synth YAML parses");
            assert_eq!(from_yaml, spec_objects(&spec), "Service {}", s.index);
        }
    }

    #[test]
    fn chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = synth::cluster(5, 2..=2);
        let m = ManifestsDir::create(dir.path(), &cluster, 2).unwrap();
        assert_eq!(m.chunk_of(3), (1, 2..4));
        let staged = m.stage_chunk(&cluster, 4).unwrap();
        staged.commit().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "node.json",
                "services-00.yaml",
                "services-01.yaml",
                "services-02.yaml"
            ]
        );
    }
}
