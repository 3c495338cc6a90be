// Package nbd owns vmshadow's implementation of the Network Block Device
// protocol (NetworkBlockDevice/nbd doc/proto.md, with QEMU's qemu:
// metadata namespace from docs/interop/nbd.rst): a client that reads
// shadow copies exported by QEMU, qemu-nbd, nbdkit or XenServer hosts, and a
// server that exposes vmshadow's own backups as NBD exports.
//
// # Client
//
// [Dial] (or [DialURI], [NewClient]) performs the fixed newstyle handshake:
// NBD_OPT_STARTTLS when the target asks for TLS, NBD_OPT_STRUCTURED_REPLY,
// NBD_OPT_SET_META_CONTEXT for the metadata contexts named in [Options], then
// NBD_OPT_GO (falling back to NBD_OPT_EXPORT_NAME only for servers without
// NBD_OPT_GO). The resulting [Client] is one connection in the transmission
// phase. It is safe for concurrent use: every call sends its own request and
// many requests are in flight at once, their replies dispatched by cookie by
// one reader goroutine. [Pool] spreads reads over several connections to one
// export.
//
// Errors: a server that reports an error for a request gives a [*ServerError]
// (the connection stays usable; it wraps the [Errno] and, where one fits, a
// class from internal/errs); a server that breaks the protocol gives a
// [*ProtocolError] and the connection is closed; a connection that breaks
// fails every request in flight and every later one with an error wrapping
// errs.ErrConnect. Handshake refusals are [*OptionError] values (errs.ErrNotFound
// for a missing export or metadata context, errs.ErrUnsupported, ...); TLS
// certificates that do not verify give errs.ErrAuth; misuse (bad URI,
// unaligned request) gives errs.ErrUsage.
//
// Extents: [Client.BlockStatus] answers one range; [Client.Extents] walks a
// range of any size one request at a time (an iter.Seq2), so that a
// multi-TiB disk is planned in bounded memory.
//
// # Server
//
// [Server] serves named [Export]s on any net.Listener. An Export provides
// Size and ReadAt; optional interfaces ([Writer], [Flusher], [Trimmer],
// [Zeroer], [ExtentReporter]) add writes, flushes, trims, zeroing and
// base:allocation block status.
package nbd
