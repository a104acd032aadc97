import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `--pod NAMESPACE/NAME`: a Kubernetes pod's network namespace, found on the node through its container runtime
/// with `crictl` (containerd, CRI-O), the way an operator would by hand:
///
///     crictl pods -o json            the pod sandboxes: id, metadata.name, metadata.namespace, state
///     crictl inspectp -o json ID     info.runtimeSpec.linux.namespaces[type=network].path (else info.pid)
///
/// Names match exactly (crictl's own `--name` filter is a regular expression); of a pod's sandboxes only the ready
/// one counts (a restarted pod keeps its old, not-ready ones for a while).
public enum PodLookup {
    public struct Sandbox: Equatable, Sendable {
        public var id: String
        public var namespace: String
        public var name: String
        public var ready: Bool
    }

    /// `NAME` alone is in the `default` namespace, as with kubectl.
    public static func split(_ pod: String) throws -> (namespace: String, name: String) {
        let parts = pod.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        switch parts.count {
        case 1 where !parts[0].isEmpty: return ("default", parts[0])
        case 2 where !parts[0].isEmpty && !parts[1].isEmpty: return (parts[0], parts[1])
        default: throw MeshtraceError(.usage, "--pod takes NAMESPACE/NAME (or NAME, in the default namespace), not '\(pod)'")
        }
    }

    /// The network namespace of the pod's ready sandbox.
    public static func netns(of pod: String) throws -> NetnsRef {
        let (namespace, name) = try split(pod)
        let label = "pod \(namespace)/\(name)"
        let list = try crictl(["pods", "-o", "json"])
        let matches = try sandboxes(fromPods: list).filter { $0.namespace == namespace && $0.name == name }
        let ready = matches.filter(\.ready)
        guard let sandbox = ready.first else {
            if matches.isEmpty {
                throw MeshtraceError(.noSuchNetns, "no \(label) on this node (crictl pods lists none by that name)")
            }
            throw MeshtraceError(.noSuchNetns, "\(label) has no ready sandbox on this node (\(matches.count) not ready): it has no network namespace to trace")
        }
        guard ready.count == 1 else {
            throw MeshtraceError(.usage, "\(label) has \(ready.count) ready sandboxes (\(ready.map(\.id).joined(separator: ", "))): name its network namespace with --netns instead")
        }
        let inspect = try crictl(["inspectp", "-o", "json", sandbox.id])
        switch try networkNamespace(fromInspect: inspect) {
        case .path(let path):
            let r = try NetnsRef.resolve(netns: path, pid: nil)
            return NetnsRef(path: r.path, label: label, pod: "\(namespace)/\(name)")
        case .pid(let pid):
            let r = try NetnsRef.resolve(netns: nil, pid: pid)
            return NetnsRef(path: r.path, label: label, pid: pid, pod: "\(namespace)/\(name)")
        case .none:
            throw MeshtraceError(.noSuchNetns, "crictl inspectp \(sandbox.id) shows no network namespace for \(label)")
        }
    }

    public enum Found: Equatable { case path(String), pid(Int32), none }

    /// `crictl pods -o json`: `{"items": [{"id", "metadata": {"name", "namespace"}, "state"}]}`.
    public static func sandboxes(fromPods json: String) throws -> [Sandbox] {
        guard let top = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else {
            throw MeshtraceError(.badInput, "crictl pods -o json did not print a JSON object")
        }
        let items = top["items"] as? [[String: Any]] ?? []
        return items.compactMap { item in
            guard let id = item["id"] as? String, let meta = item["metadata"] as? [String: Any],
                  let name = meta["name"] as? String else { return nil }
            return Sandbox(id: id, namespace: meta["namespace"] as? String ?? "", name: name,
                           ready: (item["state"] as? String) == "SANDBOX_READY")
        }
    }

    /// `crictl inspectp -o json ID`: the sandbox's network namespace file (containerd and CRI-O both put the OCI
    /// runtime spec under `info.runtimeSpec`), else its pause process (`info.pid`, containerd). A host-network pod
    /// has a network entry without a path: its pid then leads to the node's own netns, which `trace` refuses.
    public static func networkNamespace(fromInspect json: String) throws -> Found {
        guard let top = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else {
            throw MeshtraceError(.badInput, "crictl inspectp -o json did not print a JSON object")
        }
        let info = top["info"] as? [String: Any] ?? [:]
        let spec = info["runtimeSpec"] as? [String: Any]
        let linux = spec?["linux"] as? [String: Any]
        let namespaces = linux?["namespaces"] as? [[String: Any]] ?? []
        if let network = namespaces.first(where: { ($0["type"] as? String) == "network" }),
           let path = network["path"] as? String, !path.isEmpty {
            return .path(path)
        }
        if let pid = (info["pid"] as? NSNumber)?.int32Value, pid > 0 { return .pid(pid) }
        return .none
    }

    /// Runs crictl; its failures are one line: not installed (exit 7), no permission on the runtime's socket
    /// (exit 5), anything else as crictl said it (exit 4: the pod cannot be found).
    static func crictl(_ args: [String]) throws -> String {
        guard Command.which("crictl") != nil else {
            throw MeshtraceError(.missingTool, "crictl is not installed: --pod finds the pod through the node's container runtime (use --netns or --pid instead)")
        }
        let r = try Command.run(["crictl"] + args)
        guard r.ok else {
            let said = r.stderr.split(whereSeparator: \.isNewline).last.map(String.init) ?? "exit \(r.status)"
            if said.lowercased().contains("permission denied") {
                throw MeshtraceError(.noPrivilege, "crictl \(args[0]) could not reach the container runtime: \(said) (run as root)")
            }
            throw MeshtraceError(.noSuchNetns, "crictl \(args[0]) failed, so the pod cannot be found: \(said)")
        }
        return r.stdout
    }
}
