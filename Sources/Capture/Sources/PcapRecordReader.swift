// Classic pcap records read in large blocks, for the common file: the standard µs or ns magic in either byte
// order, version 2.4. libpcap's `pcap_next_ex` reads each record with two `fread`s and copies the packet into
// its own buffer; at a million records that was a tenth of an analysis. Here one `read(2)` fills a 1 MiB buffer
// and each frame is handed out in place.
//
// libpcap stays the authority on everything unusual: it opens every classic file first (magic, version,
// snaplen, link type and their errors are its), and the first record this reader does not take as plainly
// well-formed — a short header or body at the end of the file, a captured length above the file's snaplen or
// libpcap's 256 KiB maximum, a read error — ends this reader at that record's offset, where libpcap takes over
// (`PcapHandle.seek`), so damaged files end with libpcap's own words and behaviour. Files this reader does not
// take at all stay entirely with libpcap: other versions (2.3 and older may have swapped length fields, DG/UX
// 543.0), the Kuznetzov magic (longer record headers), and other-endian NFLOG captures (libpcap swaps their TLV
// headers in place).

#if canImport(Glibc)
import Glibc
#endif

final class PcapRecordReader {
    enum ReadResult {
        case packet(time: Timestamp, wireLength: UInt32, bytes: UnsafeRawBufferPointer)
        /// A clean end of file, exactly after a record.
        case end
        /// The record at this file offset is not plainly well-formed: libpcap reads the file from there.
        case irregular(offset: Int64)
    }

    static let fileHeaderLength = 24
    static let recordHeaderLength = 16
    /// libpcap's MAXIMUM_SNAPLEN: a larger captured length is an error in every link type meshtrace reads.
    static let libpcapMaximumCaplen: UInt32 = 262_144
    private static let capacity = 1 << 20

    private let fd: Int32
    private let swapped: Bool
    private let nanosecond: Bool
    /// Records up to this captured length are taken here; libpcap handles longer ones (truncating or refusing).
    private let maxCaplen: UInt32
    private let buffer: UnsafeMutableRawPointer
    /// Unread bytes are buffer[start..<end]; buffer[0] is at `bufferOffset` in the file.
    private var start = 0
    private var end = 0
    private var bufferOffset: Int64 = Int64(PcapRecordReader.fileHeaderLength)
    private var atEOF = false
    private var failed = false

    /// A reader for `path` when it is a plain version 2.4 pcap (nil otherwise: libpcap reads it all).
    /// `snapshot` and `linkType` are what libpcap made of the header (`pcap_snapshot`, `pcap_datalink`).
    static func open(path: String, snapshot: Int32, linkType: Int32) -> PcapRecordReader? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        var header = [UInt8](repeating: 0, count: fileHeaderLength)
        let got = header.withUnsafeMutableBytes { pread(fd, $0.baseAddress, fileHeaderLength, 0) }
        guard got == fileHeaderLength else { Glibc.close(fd); return nil }
        let magic = UInt32(header[0]) | UInt32(header[1]) << 8 | UInt32(header[2]) << 16 | UInt32(header[3]) << 24
        let micro: UInt32 = 0xa1b2_c3d4, nano: UInt32 = 0xa1b2_3c4d
        let littleEndian: Bool
        switch magic {
        case micro, nano: littleEndian = true
        case micro.byteSwapped, nano.byteSwapped: littleEndian = false
        default: Glibc.close(fd); return nil
        }
        func u16(_ i: Int) -> UInt16 {
            littleEndian ? UInt16(header[i]) | UInt16(header[i + 1]) << 8 : UInt16(header[i]) << 8 | UInt16(header[i + 1])
        }
        let swapped = littleEndian != (ByteOrder.host == .little)
        guard u16(4) == 2, u16(6) == 4, !(swapped && linkType == LinkType.nflog), snapshot > 0 else {
            Glibc.close(fd)
            return nil
        }
        // The records start after the file header (pread left the offset at 0).
        guard lseek(fd, off_t(fileHeaderLength), SEEK_SET) == off_t(fileHeaderLength) else {
            Glibc.close(fd)
            return nil
        }
        let isNano = magic == nano || magic == nano.byteSwapped
        return PcapRecordReader(fd: fd, swapped: swapped, nanosecond: isNano,
                                maxCaplen: min(UInt32(snapshot), libpcapMaximumCaplen))
    }

    private init(fd: Int32, swapped: Bool, nanosecond: Bool, maxCaplen: UInt32) {
        self.fd = fd
        self.swapped = swapped
        self.nanosecond = nanosecond
        self.maxCaplen = maxCaplen
        buffer = .allocate(byteCount: PcapRecordReader.capacity, alignment: 16)
    }

    deinit {
        Glibc.close(fd)
        buffer.deallocate()
    }

    @inline(__always)
    private func u32(_ at: Int) -> UInt32 {
        let v = buffer.loadUnaligned(fromByteOffset: at, as: UInt32.self)
        return swapped ? v.byteSwapped : v
    }

    /// The next record. A frame's bytes stay valid until the next call.
    func next() -> ReadResult {
        let headerLength = PcapRecordReader.recordHeaderLength
        if end - start < headerLength {
            refill()
            if end == start { return failed ? .irregular(offset: bufferOffset + Int64(start)) : .end }
            if end - start < headerLength { return .irregular(offset: bufferOffset + Int64(start)) }
        }
        let caplen = u32(start + 8)
        guard caplen <= maxCaplen else { return .irregular(offset: bufferOffset + Int64(start)) }
        let length = headerLength + Int(caplen)
        if end - start < length {
            refill()
            if end - start < length { return .irregular(offset: bufferOffset + Int64(start)) }
        }
        // Unsigned 32-bit seconds and fraction, as the format defines them (libpcap 1.10 sign-extends both: a
        // 2038-2106 capture came out before 1970, and a fraction of a second or more was kept as it was).
        let fraction = UInt64(u32(start + 4))
        let time = Timestamp(pcapSeconds: u32(start), fractionNanoseconds: nanosecond ? fraction : fraction &* 1000)
        let wireLength = u32(start + 12)
        let bytes = UnsafeRawBufferPointer(start: buffer + start + headerLength, count: Int(caplen))
        start += length
        return .packet(time: time, wireLength: wireLength, bytes: bytes)
    }

    /// Moves the unread bytes to the front and reads until the buffer is full or the file ends.
    private func refill() {
        guard !atEOF else { return }
        let unread = end - start
        if start > 0 {
            if unread > 0 { (buffer).copyMemory(from: buffer + start, byteCount: unread) }
            bufferOffset += Int64(start)
            start = 0
            end = unread
        }
        while end < PcapRecordReader.capacity {
            let n = read(fd, buffer + end, PcapRecordReader.capacity - end)
            if n > 0 { end += n; continue }
            if n < 0 && errno == EINTR { continue }
            // 0: end of file. < 0: a read error, which libpcap will meet and word at the same offset.
            if n < 0 { failed = true }
            atEOF = true
            return
        }
    }
}
