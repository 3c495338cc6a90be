package nbd

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"sync/atomic"
)

// Pool holds several connections to one export and spreads calls over
// them, each call going to the connection with the fewest bytes in flight.
// It is safe for concurrent use; callers get parallelism by calling it from
// several goroutines. Errors are those of Client.
type Pool struct {
	conns []*Client
	next  atomic.Uint64
}

// DialPool opens up to n connections to the target. More than one is
// opened only if the server allows it: it advertises NBD_FLAG_CAN_MULTI_CONN,
// or the export is read-only (no writes, so no cache to keep coherent
// between connections). Conns tells how many were opened.
func DialPool(ctx context.Context, t Target, n int, opts *Options) (*Pool, error) {
	first, err := Dial(ctx, t, opts)
	if err != nil {
		return nil, err
	}
	p := &Pool{conns: []*Client{first}}
	if !first.Flags().Has(FlagCanMultiConn) && !first.Flags().Has(FlagReadOnly) {
		n = 1
	}
	for len(p.conns) < n {
		c, err := Dial(ctx, t, opts)
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("opening connection %d of %d: %w", len(p.conns)+1, n, err)
		}
		if c.Size() != first.Size() || c.Flags() != first.Flags() {
			c.Close()
			p.Close()
			return nil, &ProtocolError{Peer: first.peer, Msg: fmt.Sprintf("connection %d sees size %d, flags %v; the first saw size %d, flags %v", len(p.conns)+1, c.Size(), c.Flags(), first.Size(), first.Flags())}
		}
		p.conns = append(p.conns, c)
	}
	return p, nil
}

// Conns is the number of connections in the pool.
func (p *Pool) Conns() int { return len(p.conns) }

// Clients returns the pool's connections.
func (p *Pool) Clients() []*Client { return p.conns }

// Size is the export size in bytes.
func (p *Pool) Size() int64 { return p.conns[0].Size() }

// Flags are the export's transmission flags.
func (p *Pool) Flags() TransmissionFlags { return p.conns[0].Flags() }

// BlockSizes are the server's size constraints.
func (p *Pool) BlockSizes() BlockSizes { return p.conns[0].BlockSizes() }

// pick returns the usable connection with the fewest bytes in flight,
// starting the scan at a rotating position so that ties spread.
func (p *Pool) pick() (*Client, error) {
	start := int(p.next.Add(1) % uint64(len(p.conns)))
	var best *Client
	var bestBusy int64
	var firstErr error
	for i := range p.conns {
		c := p.conns[(start+i)%len(p.conns)]
		if err := c.Err(); err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if b := c.busy.Load(); best == nil || b < bestBusy {
			best, bestBusy = c, b
		}
	}
	if best == nil {
		return nil, firstErr
	}
	return best, nil
}

// ReadAt reads like Client.ReadAt on the least busy connection.
func (p *Pool) ReadAt(ctx context.Context, b []byte, off int64) (int, error) {
	c, err := p.pick()
	if err != nil {
		return 0, err
	}
	return c.ReadAt(ctx, b, off)
}

// WriteAt writes like Client.WriteAt on the least busy connection.
func (p *Pool) WriteAt(ctx context.Context, b []byte, off int64) (int, error) {
	c, err := p.pick()
	if err != nil {
		return 0, err
	}
	return c.WriteAt(ctx, b, off)
}

// WriteZeroes is Client.WriteZeroes on the least busy connection.
func (p *Pool) WriteZeroes(ctx context.Context, off, length int64, punch bool) error {
	c, err := p.pick()
	if err != nil {
		return err
	}
	return c.WriteZeroes(ctx, off, length, punch)
}

// Flush makes every write the server has replied to, on any connection,
// durable (the pool has several connections only if the server guarantees
// that with NBD_FLAG_CAN_MULTI_CONN, or the export is read-only).
func (p *Pool) Flush(ctx context.Context) error {
	c, err := p.pick()
	if err != nil {
		return err
	}
	return c.Flush(ctx)
}

// BlockStatus is Client.BlockStatus on the least busy connection.
func (p *Pool) BlockStatus(ctx context.Context, name string, off, length int64) ([]Extent, error) {
	c, err := p.pick()
	if err != nil {
		return nil, err
	}
	return c.BlockStatus(ctx, name, off, length)
}

// Extents is Client.Extents, each request going to the least busy
// connection.
func (p *Pool) Extents(ctx context.Context, name string, off, length int64) iter.Seq2[Extent, error] {
	return walkExtents(ctx, p.BlockStatus, name, off, min(length, p.Size()-off))
}

// Close closes every connection.
func (p *Pool) Close() error {
	var errList []error
	for _, c := range p.conns {
		errList = append(errList, c.Close())
	}
	return errors.Join(errList...)
}

// DialPoolAvailable opens the first connection as DialPool does (its
// failure is the error), then up to n-1 more, stopping at the first that
// fails, as against a server that closes connections beyond its limit
// (XenServer's xapi-nbd serves 16 per host, all clients counted). It
// returns the pool with the connections it got, and why it got fewer
// than n (nil when it got them all).
func DialPoolAvailable(ctx context.Context, t Target, n int, opts *Options) (p *Pool, short error, err error) {
	first, err := Dial(ctx, t, opts)
	if err != nil {
		return nil, nil, err
	}
	p = &Pool{conns: []*Client{first}}
	if !first.Flags().Has(FlagCanMultiConn) && !first.Flags().Has(FlagReadOnly) {
		n = 1
	}
	for len(p.conns) < n {
		c, err := Dial(ctx, t, opts)
		if err != nil {
			if ctx.Err() != nil {
				p.Close()
				return nil, nil, err
			}
			return p, fmt.Errorf("opening connection %d of %d: %w", len(p.conns)+1, n, err), nil
		}
		if c.Size() != first.Size() || c.Flags() != first.Flags() {
			c.Close()
			p.Close()
			return nil, nil, &ProtocolError{Peer: first.peer, Msg: fmt.Sprintf("connection %d sees size %d, flags %v; the first saw size %d, flags %v", len(p.conns)+1, c.Size(), c.Flags(), first.Size(), first.Flags())}
		}
		p.conns = append(p.conns, c)
	}
	return p, nil, nil
}
