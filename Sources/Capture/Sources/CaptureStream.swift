// A capture read from a pipe: `tcpdump -w - | meshtrace analyze -`, `ssh node tcpdump -w - | ...`, a FIFO, or
// `<(...)`. Files are opened by path and sniffed by opening them again; a pipe can be read once, from its start.
// So the first bytes are looked at without being taken (tee(2) copies what a pipe holds without consuming it),
// and the reader then reads the pipe from its first byte: pcapng by meshtrace's block reader, classic pcap by libpcap
// (not in blocks: those need a file to seek in).

import Foundation
#if canImport(Glibc)
import Glibc
#endif

public enum CaptureStream {
    /// `-` names stdin.
    static let stdinName = "-"

    /// Whether `path` is to be read as a stream: `-` when stdin is not a regular file, or a FIFO.
    public static func isStream(_ path: String) -> Bool {
        var st = stat()
        if path == stdinName { return fstat(STDIN_FILENO, &st) == 0 && (st.st_mode & S_IFMT) != S_IFREG }
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFIFO
    }

    /// Ctrl-C in `tcpdump -w - | meshtrace analyze -` goes to the whole pipeline: the writer stops and the pipe
    /// ends, and the analysis should finish with what was read, not die with it. So while a pipe is read, the first
    /// SIGINT only says so (the read goes on, to the end the writer's exit makes); a second one quits.
    public static func finishOnFirstInterrupt() {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in
            let note: StaticString = "meshtrace: interrupted: finishing with what the pipe held (Ctrl-C again to quit)\n"
            _ = Glibc.write(STDERR_FILENO, note.utf8Start, note.utf8CodeUnitCount)
        }
        sigemptyset(&action.sa_mask)
        action.sa_flags = SA_RESTART | Int32(bitPattern: UInt32(SA_RESETHAND))
        sigaction(SIGINT, &action, nil)
    }

    /// The name messages use: `stdin` for `-`.
    static func displayName(_ path: String) -> String { path == stdinName ? "stdin" : path }

    /// Opens the stream and reads its first 4 bytes without consuming them. Returns the descriptor (the caller
    /// owns it) and the magic number; throws a one-line error for an empty stream or one that is not a pipe.
    static func open(_ path: String) throws -> (fd: Int32, magic: UInt32) {
        let name = displayName(path)
        let fd: Int32
        if path == stdinName {
            fd = fcntl(STDIN_FILENO, F_DUPFD_CLOEXEC, 3)
        } else {
            fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        }
        guard fd >= 0 else { throw MeshtraceError.badInput("\(name): \(String(cString: strerror(errno)))") }
        do {
            return (fd, try peekMagic(fd, name: name))
        } catch {
            Glibc.close(fd)
            throw error
        }
    }

    private static func peekMagic(_ fd: Int32, name: String) throws -> UInt32 {
        let p = makePipe()
        guard p[0] >= 0 else { throw MeshtraceError.badInput("\(name): pipe: \(String(cString: strerror(errno)))") }
        defer { Glibc.close(p[0]); Glibc.close(p[1]) }
        // tee(2) takes the output pipe's O_NONBLOCK as its own: it would not wait for the writer's first bytes.
        _ = fcntl(p[1], F_SETFL, fcntl(p[1], F_GETFL) & ~O_NONBLOCK)
        var bytes = [UInt8](repeating: 0, count: 4)
        while true {
            let n = meshtrace_tee(fd, p[1], 4, 0)
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EINVAL {
                    throw MeshtraceError.badInput("\(name): not a pipe or a regular file (a terminal or a socket?): pipe a capture in, e.g. tcpdump -w - | meshtrace analyze -")
                }
                throw MeshtraceError.badInput("\(name): \(String(cString: strerror(errno)))")
            }
            if n == 0 { throw MeshtraceError.badInput("\(name): empty input, not a capture") }
            let got = bytes.withUnsafeMutableBytes { read(p[0], $0.baseAddress, 4) }
            if n >= 4 && got == 4 { break }
            // Fewer than 4 bytes in the pipe so far: the rest is on its way, unless the writer is gone.
            var pf = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&pf, 1, 0) == 1 && pf.revents & Int16(POLLHUP) != 0 && meshtrace_tee(fd, p[1], 4, 2 /* SPLICE_F_NONBLOCK */) < 4 {
                throw MeshtraceError.badInput("\(name): the capture's file header is truncated (\(n) bytes)")
            }
            while read(p[0], &bytes, 4) > 0 {}
            usleep(1000)
        }
        return UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
    }
}

/// tee(2) (glibc declares it only under _GNU_SOURCE).
@_silgen_name("tee")
private func meshtrace_tee(_ fdIn: Int32, _ fdOut: Int32, _ len: Int, _ flags: UInt32) -> Int
