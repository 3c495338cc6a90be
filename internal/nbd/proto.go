package nbd

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// This file holds the protocol constants and the encoding and decoding of
// every fixed-layout message. Decoders take untrusted bytes and return an
// error instead of panicking; they are fuzzed in proto_fuzz_test.go.

// Magic numbers.
const (
	magicInit            = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpts            = 0x49484156454F5054 // "IHAVEOPT"
	magicOldstyle        = 0x00420281861253   // cliserv_magic, oldstyle negotiation
	magicOptReply        = 0x3e889045565a9
	magicRequest         = 0x25609513
	magicSimpleReply     = 0x67446698
	magicStructuredReply = 0x668e33ef
	magicExtendedReply   = 0x6e8a278c // extended headers: never negotiated by us
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1
)

// TransmissionFlags are the per-export flags the server sends at the end of
// the handshake.
type TransmissionFlags uint16

// Transmission flags (proto.md "Transmission flags").
const (
	FlagHasFlags           TransmissionFlags = 1 << 0
	FlagReadOnly           TransmissionFlags = 1 << 1
	FlagSendFlush          TransmissionFlags = 1 << 2
	FlagSendFUA            TransmissionFlags = 1 << 3
	FlagRotational         TransmissionFlags = 1 << 4
	FlagSendTrim           TransmissionFlags = 1 << 5
	FlagSendWriteZeroes    TransmissionFlags = 1 << 6
	FlagSendDF             TransmissionFlags = 1 << 7
	FlagCanMultiConn       TransmissionFlags = 1 << 8
	FlagSendResize         TransmissionFlags = 1 << 9
	FlagSendCache          TransmissionFlags = 1 << 10
	FlagSendFastZero       TransmissionFlags = 1 << 11
	FlagBlockStatusPayload TransmissionFlags = 1 << 12
)

var transmissionFlagNames = []string{"has-flags", "read-only", "flush", "fua",
	"rotational", "trim", "write-zeroes", "df", "multi-conn", "resize", "cache",
	"fast-zero", "block-status-payload"}

// Has reports whether every flag in f2 is set in f.
func (f TransmissionFlags) Has(f2 TransmissionFlags) bool { return f&f2 == f2 }

func (f TransmissionFlags) String() string {
	var names []string
	for i, n := range transmissionFlagNames {
		if f&(1<<i) != 0 {
			names = append(names, n)
		}
	}
	if rest := f &^ (1<<len(transmissionFlagNames) - 1); rest != 0 {
		names = append(names, fmt.Sprintf("0x%x", uint16(rest)))
	}
	return strings.Join(names, ",")
}

// Options (handshake phase).
const (
	optExportName       = 1
	optAbort            = 2
	optList             = 3
	optStartTLS         = 5
	optInfo             = 6
	optGo               = 7
	optStructuredReply  = 8
	optListMetaContext  = 9
	optSetMetaContext   = 10
	optExtendedHeaders  = 11
	repAck              = 1
	repServer           = 2
	repInfo             = 3
	repMetaContext      = 4
	repFlagError        = 1 << 31
	repErrUnsup         = repFlagError | 1
	repErrPolicy        = repFlagError | 2
	repErrInvalid       = repFlagError | 3
	repErrPlatform      = repFlagError | 4
	repErrTLSReqd       = repFlagError | 5
	repErrUnknown       = repFlagError | 6
	repErrShutdown      = repFlagError | 7
	repErrBlockSizeReqd = repFlagError | 8
	repErrTooBig        = repFlagError | 9
	infoExport          = 0
	infoName            = 1
	infoDescription     = 2
	infoBlockSize       = 3
)

func optName(o uint32) string {
	switch o {
	case optExportName:
		return "NBD_OPT_EXPORT_NAME"
	case optAbort:
		return "NBD_OPT_ABORT"
	case optList:
		return "NBD_OPT_LIST"
	case optStartTLS:
		return "NBD_OPT_STARTTLS"
	case optInfo:
		return "NBD_OPT_INFO"
	case optGo:
		return "NBD_OPT_GO"
	case optStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case optListMetaContext:
		return "NBD_OPT_LIST_META_CONTEXT"
	case optSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	case optExtendedHeaders:
		return "NBD_OPT_EXTENDED_HEADERS"
	}
	return fmt.Sprintf("option %d", o)
}

func repName(r uint32) string {
	switch r {
	case repAck:
		return "NBD_REP_ACK"
	case repServer:
		return "NBD_REP_SERVER"
	case repInfo:
		return "NBD_REP_INFO"
	case repMetaContext:
		return "NBD_REP_META_CONTEXT"
	case repErrUnsup:
		return "NBD_REP_ERR_UNSUP"
	case repErrPolicy:
		return "NBD_REP_ERR_POLICY"
	case repErrInvalid:
		return "NBD_REP_ERR_INVALID"
	case repErrPlatform:
		return "NBD_REP_ERR_PLATFORM"
	case repErrTLSReqd:
		return "NBD_REP_ERR_TLS_REQD"
	case repErrUnknown:
		return "NBD_REP_ERR_UNKNOWN"
	case repErrShutdown:
		return "NBD_REP_ERR_SHUTDOWN"
	case repErrBlockSizeReqd:
		return "NBD_REP_ERR_BLOCK_SIZE_REQD"
	case repErrTooBig:
		return "NBD_REP_ERR_TOO_BIG"
	}
	return fmt.Sprintf("reply type 0x%x", r)
}

// Commands and command flags (transmission phase).
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4
)

func cmdName(c uint16) string {
	switch c {
	case cmdRead:
		return "NBD_CMD_READ"
	case cmdWrite:
		return "NBD_CMD_WRITE"
	case cmdDisc:
		return "NBD_CMD_DISC"
	case cmdFlush:
		return "NBD_CMD_FLUSH"
	case cmdTrim:
		return "NBD_CMD_TRIM"
	case cmdCache:
		return "NBD_CMD_CACHE"
	case cmdWriteZeroes:
		return "NBD_CMD_WRITE_ZEROES"
	case cmdBlockStatus:
		return "NBD_CMD_BLOCK_STATUS"
	}
	return fmt.Sprintf("command %d", c)
}

// Structured reply flags and chunk types.
const (
	replyFlagDone = 1 << 0

	chunkNone        = 0
	chunkOffsetData  = 1
	chunkOffsetHole  = 2
	chunkBlockStatus = 5
	chunkFlagError   = 1 << 15
	chunkError       = chunkFlagError | 1
	chunkErrorOffset = chunkFlagError | 2
)

// Metadata contexts and their flags.
const (
	// ContextBaseAllocation is the standard allocation context; its extents
	// carry StateHole and StateZero.
	ContextBaseAllocation = "base:allocation"
	// ContextAllocationDepth is QEMU's context whose flags are the depth in
	// the backing chain providing the data (0 unallocated, 1 top layer, ...).
	ContextAllocationDepth = "qemu:allocation-depth"

	// StateHole (base:allocation): the extent is not allocated.
	StateHole = 1 << 0
	// StateZero (base:allocation): the extent reads as zeroes.
	StateZero = 1 << 1
	// StateDirty (qemu:dirty-bitmap:NAME): the extent is dirty.
	StateDirty = 1 << 0
)

// ContextDirtyBitmap is the metadata context through which QEMU exports the
// dirty bitmap exported under name (qemu-nbd -B NAME, block-export-add
// "bitmaps"); its extents carry StateDirty.
func ContextDirtyBitmap(name string) string { return "qemu:dirty-bitmap:" + name }

// Sizes and limits.
const (
	requestHeaderLen     = 28
	simpleReplyLen       = 16
	structuredReplyLen   = 20
	optionHeaderLen      = 16
	optReplyHeaderLen    = 20
	maxStringLen         = 4096 // proto.md: strings MUST be no longer than 4096 bytes
	maxOptionLen         = 64 << 10
	maxOptReplyLen       = 64 << 10
	defaultMaxBlockSize  = 32 << 20 // interoperable maximum for READ/WRITE without NBD_INFO_BLOCK_SIZE
	maxMinimumBlockSize  = 64 << 10
	maxBlockStatusExtent = 1 << 20 // descriptors per BLOCK_STATUS chunk we accept
	maxErrorChunkLen     = 14 + maxStringLen
)

// Errno is an NBD error value as carried in replies.
type Errno uint32

// NBD error values (proto.md "Error values").
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

func (e Errno) Error() string {
	switch e {
	case EPERM:
		return "operation not permitted (EPERM)"
	case EIO:
		return "input/output error (EIO)"
	case ENOMEM:
		return "cannot allocate memory (ENOMEM)"
	case EINVAL:
		return "invalid argument (EINVAL)"
	case ENOSPC:
		return "no space left on device (ENOSPC)"
	case EOVERFLOW:
		return "value too large (EOVERFLOW)"
	case ENOTSUP:
		return "operation not supported (ENOTSUP)"
	case ESHUTDOWN:
		return "server is shutting down (ESHUTDOWN)"
	}
	return fmt.Sprintf("NBD error %d", uint32(e))
}

// ---- transmission phase: requests ----

// request is a decoded request header.
type requestHeader struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

func putRequestHeader(b []byte, h requestHeader) {
	_ = b[requestHeaderLen-1]
	binary.BigEndian.PutUint32(b[0:], magicRequest)
	binary.BigEndian.PutUint16(b[4:], h.flags)
	binary.BigEndian.PutUint16(b[6:], h.typ)
	binary.BigEndian.PutUint64(b[8:], h.cookie)
	binary.BigEndian.PutUint64(b[16:], h.offset)
	binary.BigEndian.PutUint32(b[24:], h.length)
}

func parseRequestHeader(b []byte) (requestHeader, error) {
	if len(b) < requestHeaderLen {
		return requestHeader{}, fmt.Errorf("request header is %d bytes, want %d", len(b), requestHeaderLen)
	}
	if m := binary.BigEndian.Uint32(b); m != magicRequest {
		return requestHeader{}, fmt.Errorf("bad request magic 0x%08x (want 0x%08x)", m, magicRequest)
	}
	return requestHeader{
		flags:  binary.BigEndian.Uint16(b[4:]),
		typ:    binary.BigEndian.Uint16(b[6:]),
		cookie: binary.BigEndian.Uint64(b[8:]),
		offset: binary.BigEndian.Uint64(b[16:]),
		length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// ---- transmission phase: replies ----

func putSimpleReply(b []byte, errno Errno, cookie uint64) {
	binary.BigEndian.PutUint32(b[0:], magicSimpleReply)
	binary.BigEndian.PutUint32(b[4:], uint32(errno))
	binary.BigEndian.PutUint64(b[8:], cookie)
}

// chunkHeader is a structured reply chunk header.
type chunkHeader struct {
	flags  uint16
	typ    uint16
	cookie uint64
	length uint32
}

func putChunkHeader(b []byte, h chunkHeader) {
	binary.BigEndian.PutUint32(b[0:], magicStructuredReply)
	binary.BigEndian.PutUint16(b[4:], h.flags)
	binary.BigEndian.PutUint16(b[6:], h.typ)
	binary.BigEndian.PutUint64(b[8:], h.cookie)
	binary.BigEndian.PutUint32(b[16:], h.length)
}

// parseChunkHeader decodes the 16 bytes that follow the structured reply magic.
func parseChunkHeader(b []byte) chunkHeader {
	return chunkHeader{
		flags:  binary.BigEndian.Uint16(b[0:]),
		typ:    binary.BigEndian.Uint16(b[2:]),
		cookie: binary.BigEndian.Uint64(b[4:]),
		length: binary.BigEndian.Uint32(b[12:]),
	}
}

func chunkName(t uint16) string {
	switch t {
	case chunkNone:
		return "NBD_REPLY_TYPE_NONE"
	case chunkOffsetData:
		return "NBD_REPLY_TYPE_OFFSET_DATA"
	case chunkOffsetHole:
		return "NBD_REPLY_TYPE_OFFSET_HOLE"
	case chunkBlockStatus:
		return "NBD_REPLY_TYPE_BLOCK_STATUS"
	case chunkError:
		return "NBD_REPLY_TYPE_ERROR"
	case chunkErrorOffset:
		return "NBD_REPLY_TYPE_ERROR_OFFSET"
	}
	return fmt.Sprintf("chunk type 0x%04x", t)
}

// parseOffsetHole decodes an NBD_REPLY_TYPE_OFFSET_HOLE payload.
func parseOffsetHole(p []byte) (offset uint64, size uint32, err error) {
	if len(p) != 12 {
		return 0, 0, fmt.Errorf("%s payload is %d bytes, want 12", chunkName(chunkOffsetHole), len(p))
	}
	offset, size = binary.BigEndian.Uint64(p), binary.BigEndian.Uint32(p[8:])
	if size == 0 {
		return 0, 0, fmt.Errorf("%s with hole size 0", chunkName(chunkOffsetHole))
	}
	return offset, size, nil
}

// errorChunk is a decoded error chunk payload.
type errorChunk struct {
	errno     Errno
	message   string
	offset    uint64
	hasOffset bool
}

// parseErrorChunk decodes the payload of an error chunk (any type with bit 15
// set). Types other than NBD_REPLY_TYPE_ERROR_OFFSET carry no offset.
func parseErrorChunk(typ uint16, p []byte) (errorChunk, error) {
	if len(p) < 6 {
		return errorChunk{}, fmt.Errorf("%s payload is %d bytes, want at least 6", chunkName(typ), len(p))
	}
	ec := errorChunk{errno: Errno(binary.BigEndian.Uint32(p))}
	if ec.errno == 0 {
		return errorChunk{}, fmt.Errorf("%s with error value 0", chunkName(typ))
	}
	msgLen := int(binary.BigEndian.Uint16(p[4:]))
	rest := p[6:]
	if msgLen > len(rest) {
		return errorChunk{}, fmt.Errorf("%s message length %d exceeds payload (%d bytes left)", chunkName(typ), msgLen, len(rest))
	}
	ec.message = sanitize(rest[:msgLen])
	rest = rest[msgLen:]
	if typ == chunkErrorOffset {
		if len(rest) != 8 {
			return errorChunk{}, fmt.Errorf("%s has %d bytes after the message, want an 8-byte offset", chunkName(typ), len(rest))
		}
		ec.offset, ec.hasOffset = binary.BigEndian.Uint64(rest), true
	}
	return ec, nil
}

// putErrorChunkPayload appends an NBD_REPLY_TYPE_ERROR payload.
func appendErrorChunkPayload(b []byte, errno Errno, msg string) []byte {
	if len(msg) > maxStringLen {
		msg = msg[:maxStringLen]
	}
	b = binary.BigEndian.AppendUint32(b, uint32(errno))
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

// blockStatusHeader checks the layout of an NBD_REPLY_TYPE_BLOCK_STATUS
// payload and returns its context ID and descriptor count; descriptor i is at
// p[4+8*i:].
func parseBlockStatusHeader(p []byte) (ctxID uint32, n int, err error) {
	if len(p) < 12 || (len(p)-4)%8 != 0 {
		return 0, 0, fmt.Errorf("%s payload is %d bytes, want 4 + a positive multiple of 8", chunkName(chunkBlockStatus), len(p))
	}
	return binary.BigEndian.Uint32(p), (len(p) - 4) / 8, nil
}

// blockStatusDescriptor returns descriptor i of a payload checked by
// parseBlockStatusHeader.
func blockStatusDescriptor(p []byte, i int) (length, flags uint32) {
	d := p[4+8*i:]
	return binary.BigEndian.Uint32(d), binary.BigEndian.Uint32(d[4:])
}

// ---- handshake phase ----

func appendOptionHeader(b []byte, opt uint32, length int) []byte {
	b = binary.BigEndian.AppendUint64(b, magicOpts)
	b = binary.BigEndian.AppendUint32(b, opt)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

// optReplyHeader is a decoded option reply header.
type optReplyHeader struct {
	option uint32
	typ    uint32
	length uint32
}

func parseOptReplyHeader(b []byte) (optReplyHeader, error) {
	if m := binary.BigEndian.Uint64(b); m != magicOptReply {
		return optReplyHeader{}, fmt.Errorf("bad option reply magic 0x%x (want 0x%x)", m, uint64(magicOptReply))
	}
	h := optReplyHeader{
		option: binary.BigEndian.Uint32(b[8:]),
		typ:    binary.BigEndian.Uint32(b[12:]),
		length: binary.BigEndian.Uint32(b[16:]),
	}
	if h.length > maxOptReplyLen {
		return optReplyHeader{}, fmt.Errorf("%s reply to %s is %d bytes long, more than the %d accepted", repName(h.typ), optName(h.option), h.length, maxOptReplyLen)
	}
	return h, nil
}

func appendOptReplyHeader(b []byte, opt, typ uint32, length int) []byte {
	b = binary.BigEndian.AppendUint64(b, magicOptReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

// appendString appends a string preceded by its 32-bit length.
func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// readString decodes a 32-bit length and the string that follows, returning
// the remainder.
func readString(p []byte, what string) (string, []byte, error) {
	if len(p) < 4 {
		return "", nil, fmt.Errorf("%s: %d bytes left, want a 4-byte length", what, len(p))
	}
	n := binary.BigEndian.Uint32(p)
	p = p[4:]
	if n > maxStringLen {
		return "", nil, fmt.Errorf("%s is %d bytes long, more than the %d allowed", what, n, maxStringLen)
	}
	if int(n) > len(p) {
		return "", nil, fmt.Errorf("%s length %d exceeds the %d bytes left", what, n, len(p))
	}
	return string(p[:n]), p[n:], nil
}

// exportInfo is what NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE describe.
type exportInfo struct {
	size       uint64
	flags      TransmissionFlags
	haveExport bool
	blockSizes BlockSizes
	haveBlock  bool
	name       string
	desc       string
}

// BlockSizes are an export's size constraints (proto.md "Block size
// constraints"). Offsets and lengths of requests must be multiples of Min;
// READ and WRITE requests must not be longer than Max.
type BlockSizes struct {
	Min, Preferred, Max uint32
}

// parseInfoReply decodes an NBD_REP_INFO payload into info. Unknown
// information types are ignored, as the protocol requires.
func parseInfoReply(p []byte, info *exportInfo) error {
	if len(p) < 2 {
		return fmt.Errorf("NBD_REP_INFO payload is %d bytes, want at least 2", len(p))
	}
	typ := binary.BigEndian.Uint16(p)
	d := p[2:]
	switch typ {
	case infoExport:
		if len(d) != 10 {
			return fmt.Errorf("NBD_INFO_EXPORT payload is %d bytes, want 10", len(d))
		}
		info.size = binary.BigEndian.Uint64(d)
		info.flags = TransmissionFlags(binary.BigEndian.Uint16(d[8:]))
		info.haveExport = true
	case infoBlockSize:
		if len(d) != 12 {
			return fmt.Errorf("NBD_INFO_BLOCK_SIZE payload is %d bytes, want 12", len(d))
		}
		bs := BlockSizes{binary.BigEndian.Uint32(d), binary.BigEndian.Uint32(d[4:]), binary.BigEndian.Uint32(d[8:])}
		if err := bs.validate(); err != nil {
			return err
		}
		info.blockSizes, info.haveBlock = bs, true
	case infoName:
		info.name = sanitize(d)
	case infoDescription:
		info.desc = sanitize(d)
	}
	return nil
}

func (bs BlockSizes) validate() error {
	isPow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	switch {
	case !isPow2(bs.Min) || bs.Min > maxMinimumBlockSize:
		return fmt.Errorf("server advertised minimum block size %d: not a power of 2 up to 64 KiB", bs.Min)
	case !isPow2(bs.Preferred) || bs.Preferred < bs.Min:
		return fmt.Errorf("server advertised preferred block size %d: not a power of 2 at least the minimum %d", bs.Preferred, bs.Min)
	case bs.Max < bs.Min || (bs.Max != 0xffffffff && bs.Max%bs.Min != 0):
		return fmt.Errorf("server advertised maximum block size %d: not a multiple of the minimum %d", bs.Max, bs.Min)
	}
	return nil
}

// parseMetaContextReply decodes an NBD_REP_META_CONTEXT payload.
func parseMetaContextReply(p []byte) (id uint32, name string, err error) {
	if len(p) < 4 {
		return 0, "", fmt.Errorf("NBD_REP_META_CONTEXT payload is %d bytes, want at least 4", len(p))
	}
	if len(p)-4 > maxStringLen {
		return 0, "", fmt.Errorf("NBD_REP_META_CONTEXT name is %d bytes long, more than %d", len(p)-4, maxStringLen)
	}
	return binary.BigEndian.Uint32(p), string(p[4:]), nil
}

// parseServerReply decodes an NBD_REP_SERVER payload (NBD_OPT_LIST).
func parseServerReply(p []byte) (name, desc string, err error) {
	if len(p) < 4 {
		return "", "", fmt.Errorf("NBD_REP_SERVER payload is %d bytes, want at least 4", len(p))
	}
	n := binary.BigEndian.Uint32(p)
	if uint64(n) > uint64(len(p)-4) {
		return "", "", fmt.Errorf("NBD_REP_SERVER name length %d exceeds the %d bytes left", n, len(p)-4)
	}
	return string(p[4 : 4+n]), sanitize(p[4+n:]), nil
}

// parseInfoRequest decodes the data of NBD_OPT_INFO and NBD_OPT_GO.
func parseInfoRequest(data []byte) (name string, infos []uint16, err error) {
	name, rest, err := readString(data, "export name")
	if err != nil {
		return "", nil, err
	}
	if len(rest) < 2 {
		return "", nil, fmt.Errorf("information request count missing")
	}
	n := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*n {
		return "", nil, fmt.Errorf("%d information requests announced, %d bytes follow", n, len(rest))
	}
	for i := range n {
		infos = append(infos, binary.BigEndian.Uint16(rest[2*i:]))
	}
	return name, infos, nil
}

func appendInfoRequest(b []byte, name string, infos ...uint16) []byte {
	b = appendString(b, name)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// parseMetaContextRequest decodes the data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
func parseMetaContextRequest(data []byte) (name string, queries []string, err error) {
	name, rest, err := readString(data, "export name")
	if err != nil {
		return "", nil, err
	}
	if len(rest) < 4 {
		return "", nil, fmt.Errorf("query count missing")
	}
	n := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	// Each query takes at least 4 bytes: reject counts the data cannot hold
	// before allocating anything.
	if uint64(n)*4 > uint64(len(rest)) {
		return "", nil, fmt.Errorf("%d queries announced, only %d bytes follow", n, len(rest))
	}
	for range n {
		var q string
		if q, rest, err = readString(rest, "query"); err != nil {
			return "", nil, err
		}
		queries = append(queries, q)
	}
	if len(rest) != 0 {
		return "", nil, fmt.Errorf("%d bytes after the last query", len(rest))
	}
	return name, queries, nil
}

func appendMetaContextRequest(b []byte, name string, queries []string) []byte {
	b = appendString(b, name)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = appendString(b, q)
	}
	return b
}

// sanitize makes a peer-supplied message safe to embed in an error: valid
// UTF-8, no control characters, bounded length.
func sanitize(b []byte) string {
	if len(b) > maxStringLen {
		b = b[:maxStringLen]
	}
	s := strings.ToValidUTF8(string(b), "?")
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}
