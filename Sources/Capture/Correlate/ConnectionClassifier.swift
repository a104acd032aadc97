// What a finished connection was, and whether it is a finding. Decided once, when the connection is
// emitted, from everything gathered about it (views, marks, where it left, the hop it is part of).

extension Correlator {
    /// The ztunnel port a connection was captured to: its post-NAT destination port, or the port its REDIRECT or
    /// TPROXY hit named.
    func redirectPort(of c: ConnectionState) -> UInt16? {
        if let nat = c.natResponder { return nat.port }
        if case .redirected(let p, _)? = c.timeline.redirect { return p }
        if case .tproxied(let p, _)? = c.timeline.redirect { return p }
        return nil
    }

    func classify(_ c: ConnectionState) -> (ConnectionKind, [EscapeFinding]) {
        let o = options
        let original = FiveTuple(proto: c.proto, src: c.initiator, dst: c.responder)
        // The pod's addresses once: the getter copies the array (and may infer them again) on every use.
        let pod = podAddresses
        let local = initiatorIsLocal(c, pod: pod)
        let leftPod = !c.leftFrames.isEmpty && local
        var asInnerOut = false, asOuterOut = false, asInnerIn = false, asOuterIn = false
        for link in c.hopLinks {
            if link.hop.direction == .outbound {
                if link.inner === c { asInnerOut = true }
                if link.outer === c { asOuterOut = true }
            } else {
                if link.inner === c { asInnerIn = true }
                if link.outer === c { asOuterIn = true }
            }
        }
        let redirectPort = redirectPort(of: c)
        let exempt = c.responder.addr.isLoopback || isProbe(c.responder.addr) || isProbe(c.initiator.addr)
            || pod.contains(c.responder.addr)

        switch c.proto {
        case IPProto.tcp:
            if isProbe(c.initiator.addr) || isProbe(c.responder.addr) { return (.probe, []) }
            if redirectPort == o.outboundCapturePort || asOuterOut { return (.appOutbound, []) }
            if redirectPort == o.inboundPlaintextPort { return (.inboundPlaintext, []) }
            if redirectPort == o.dnsCapturePort || c.responder.port == 53 && redirectPort != nil { return (.dns, []) }
            if asInnerOut { return (c.responder.port == o.hbonePort ? .hboneOutbound : .ztunnelPassthrough, []) }
            if asInnerIn { return (.ztunnelToApp, []) }
            if asOuterIn { return (c.responder.port == o.hbonePort ? .hboneInbound : .inboundPlaintext, []) }
            // The last packets of one of ztunnel's connections out of the pod, already printed, read late (the reader
            // far behind): not a new connection, whether a twin's copy brought its mark or the capture alone did not
            // (then a passthrough's tail read as app TCP that bypassed the capture).
            if local && isTailOfEmitted(c) { return (c.responder.port == o.hbonePort ? .hboneOutbound : .ztunnelPassthrough, []) }
            if local && c.sawZtunnelMark && !c.responder.addr.isLoopback && !isLocal(c.responder.addr, pod: pod) {
                if explainedByDNSProxy(c) { return (.dns, []) }
                let kind: ConnectionKind = c.responder.port == o.hbonePort ? .hboneOutbound : .ztunnelPassthrough
                guard leftPod || c.leftFrames.isEmpty else { return (kind, []) }
                // No app connection in this capture explains ztunnel's mark on it. A tunnel to :15008 opened before
                // the capture started (ztunnel pools HBONE connections) is the innocent reading, so say so.
                let pooled = c.responder.port == o.hbonePort
                // Opened before the capture (no SYN), and its data lined up with a packet of a connection whose join
                // went to another tunnel: the pooled tunnel that connection may well have gone through. Under
                // concurrency such a join is a guess (low), so this one is not called unexplained.
                if pooled && !c.initiatorFromSYN && c.relayCouldHaveCarried { return (kind, []) }
                let confidence: Confidence = pooled ? .low : (c.initiatorFromSYN ? .high : .medium)
                let why = pooled
                    ? "a connection to :\(o.hbonePort) carried ztunnel's mark 0x\(hex(o.ztunnelMark)) but no app connection in the capture explains it (a tunnel opened before the capture, or a process forging the mark)"
                    : "a connection carried ztunnel's mark 0x\(hex(o.ztunnelMark)) but no redirected app connection explains it: a process set the mark itself and bypassed the capture rule"
                return (kind, [EscapeFinding(findingClass: .forgedZtunnelMark, connection: c.id, tuple: original,
                                             summary: why, frames: Array((c.ztunnelMarkFrames + c.leftFrames).prefix(8)),
                                             confidence: confidence)])
            }
            if !local && c.responder.port == o.hbonePort && isLocal(c.responder.addr, pod: pod) { return (.hboneInbound, []) }
            if c.responder.addr.isLoopback || c.responder.addr == c.initiator.addr { return (.local, []) }
            if c.sawLoopback && c.leftFrames.isEmpty && !c.initiatorArrivedFromOutside {
                if !local && isLocal(c.responder.addr, pod: pod) { return (.ztunnelToApp, []) }
                if local && isLocal(c.responder.addr, pod: pod) { return (.local, []) }
            }
            if local && c.responder.port == o.hbonePort && c.leftFrames.isEmpty == false {
                return (.hboneOutbound, [])
            }
            if leftPod && !exempt {
                let confidence: Confidence = c.sawNflog || c.initiatorFromSYN ? .high : .medium
                return (.unknown, [EscapeFinding(
                    findingClass: .uncapturedTCP, connection: c.id, tuple: original,
                    summary: "app TCP to \(c.responder) left the pod without passing ztunnel: no redirect to :\(o.outboundCapturePort) and no ztunnel hop",
                    frames: c.leftFrames, confidence: confidence)])
            }
            if !local && isLocal(c.responder.addr, pod: pod) && c.initiatorArrivedFromOutside {
                return (c.responder.port == o.hbonePort ? .hboneInbound : .unknown, [])
            }
            return (.unknown, [])

        case IPProto.udp:
            if c.responder.port == 53 || redirectPort == o.dnsCapturePort || c.initiator.port == 53 { return (.dns, []) }
            if c.responder.addr.isLoopback || c.responder.addr == c.initiator.addr { return (.local, []) }
            return (.uncapturedByDesign, byDesignFinding(c, original, leftPod: leftPod, exempt: exempt, what: "non-DNS UDP"))

        default:
            if c.responder.addr.isLoopback || c.responder.addr == c.initiator.addr { return (.local, []) }
            return (.uncapturedByDesign, byDesignFinding(c, original, leftPod: leftPod, exempt: exempt,
                                                         what: IPProto.name(c.proto).uppercased()))
        }
    }

    private func byDesignFinding(_ c: ConnectionState, _ original: FiveTuple, leftPod: Bool, exempt: Bool,
                                 what: String) -> [EscapeFinding] {
        guard leftPod, !exempt else { return [] }
        return [EscapeFinding(findingClass: .byDesign, connection: c.id, tuple: original,
                              summary: "\(what) left the pod without passing ztunnel: ambient captures only TCP and DNS (by design)",
                              frames: c.leftFrames, confidence: .high)]
    }
}
