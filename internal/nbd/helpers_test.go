package nbd

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// memExport is an in-memory Export for tests: every capability, with
// allocation tracked per 64 KiB block.
type memExport struct {
	mu      sync.Mutex
	data    []byte
	alloc   []bool // per memBlock
	flushes int
	// readErr, if set, fails reads overlapping [readErrOff, readErrOff+1).
	readErr    error
	readErrOff int64
	readDelay  time.Duration
}

const memBlock = 64 << 10

func newMemExport(size int64) *memExport {
	return &memExport{data: make([]byte, size), alloc: make([]bool, (size+memBlock-1)/memBlock)}
}

func (m *memExport) Size() int64 { return int64(len(m.data)) }

func (m *memExport) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	m.mu.Lock()
	delay := m.readDelay
	m.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.readErr != nil && off <= m.readErrOff && m.readErrOff < off+int64(len(p)) {
		return 0, m.readErr
	}
	return copy(p, m.data[off:]), nil
}

func (m *memExport) WriteAt(_ context.Context, p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := copy(m.data[off:], p)
	m.setAlloc(off, int64(n), true)
	return n, nil
}

func (m *memExport) setAlloc(off, length int64, v bool) {
	if length == 0 {
		return
	}
	for b := off / memBlock; b <= (off+length-1)/memBlock; b++ {
		// only whole blocks are deallocated
		if v || (b*memBlock >= off && (b+1)*memBlock <= off+length) {
			m.alloc[b] = v
		}
	}
}

func (m *memExport) Flush(context.Context) error {
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}

func (m *memExport) Trim(_ context.Context, off, length int64) error {
	return m.WriteZeroes(context.Background(), off, length, true)
}

func (m *memExport) WriteZeroes(_ context.Context, off, length int64, punch bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	if punch {
		m.setAlloc(off, length, false)
	} else {
		m.setAlloc(off, length, true)
	}
	return nil
}

func (m *memExport) Extents(_ context.Context, off, length int64) ([]Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Extent
	for pos, end := off, off+length; pos < end; {
		b := pos / memBlock
		next := min((b+1)*memBlock, end)
		var flags uint32
		if !m.alloc[b] {
			flags = StateHole | StateZero
		}
		if k := len(out); k > 0 && out[k-1].Flags == flags {
			out[k-1].Length += next - pos
		} else {
			out = append(out, Extent{pos, next - pos, flags})
		}
		pos = next
	}
	return out, nil
}

// fill writes random data into the given blocks and marks them allocated.
func (m *memExport) fill(rng *rand.Rand, blocks ...int64) {
	for _, b := range blocks {
		off := b * memBlock
		end := min(off+memBlock, int64(len(m.data)))
		for i := off; i < end; i++ {
			m.data[i] = byte(rng.Uint32())
		}
		m.alloc[b] = true
	}
}

func (m *memExport) flushCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.flushes
}

func (m *memExport) snapshot() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.data)
}

// startServer serves exports on a unix socket and on 127.0.0.1 and stops
// the server when the test ends.
func startServer(t testing.TB, opts *ServerOptions, exports map[string]Export, eopts map[string]ExportOptions) (s *Server, sock, tcpAddr string) {
	t.Helper()
	s = NewServer(opts)
	for name, e := range exports {
		if err := s.AddExport(name, e, eopts[name]); err != nil {
			t.Fatal(err)
		}
	}
	sock = filepath.Join(shortTempDir(t), "nbd.sock")
	ul, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for _, l := range []net.Listener{ul, tl} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.Serve(l); err != ErrServerClosed {
				t.Errorf("Serve: %v", err)
			}
		}()
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		wg.Wait()
	})
	return s, sock, tl.Addr().String()
}

// shortTempDir is a temporary directory with a path short enough for unix
// socket names (108 bytes).
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func unixURI(sock, export string) string {
	return fmt.Sprintf("nbd+unix:///%s?socket=%s", export, sock)
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dialT(t testing.TB, uri string, opts *Options) *Client {
	t.Helper()
	c, err := DialURI(testCtx(t), uri, opts)
	if err != nil {
		t.Fatalf("dial %s: %v", uri, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)) }
