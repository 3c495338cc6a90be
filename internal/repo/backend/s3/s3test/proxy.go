package s3test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// FaultProxy sits between a client and the real S3 server and breaks
// chosen requests the ways networks and overloaded stores do.
type FaultProxy struct {
	target string // host:port of the real server
	srv    *httptest.Server
	tr     *http.Transport

	mu          sync.Mutex
	rules       []*Rule
	inflight    int
	maxInflight int
	requests    int
	skew        time.Duration
	delay       time.Duration
	release     chan struct{} // closed by Release
}

type Action int

// What a rule does to a request.
const (
	SlowDown     Action = iota // 503 SlowDown, after reading the body
	ServerError                // 500 InternalError
	NotFound                   // 404 NoSuchKey (a stale read)
	FakeOK                     // 200 without forwarding (a lost write)
	DropRequest                // read the body, close the connection (the store never saw it)
	DropResponse               // forward, then close without the answer (the store did it)
	CutUpload                  // forward half the body, then cut both connections
	CutDownload                // forward, send half of the response body, cut
	Hang                       // read the body and never answer
	Hold                       // wait until Release, then forward
	Fail                       // answer with the rule's Status and Code
	Corrupt                    // forward the request with one body byte changed
)

// Rule applies Act to the From-th through To-th requests (1-based; To 0:
// all from From on) whose method and path?query match.
type Rule struct {
	Method   string // "" any
	Contains string // substring of path?query; "" any
	From, To int
	Act      Action
	Status   int    // for Fail
	Code     string // for Fail
	seen     int
	hits     int
}

// NewFaultProxy starts a proxy to target (host:port) for the test.
func NewFaultProxy(t testing.TB, target string) *FaultProxy {
	p := &FaultProxy{target: target, tr: &http.Transport{DisableCompression: true}, release: make(chan struct{})}
	p.srv = httptest.NewServer(p)
	t.Cleanup(func() { p.srv.CloseClientConnections(); p.srv.Close(); p.tr.CloseIdleConnections() })
	return p
}

// Endpoint is the proxy's host:port, for the client.
func (p *FaultProxy) Endpoint() string { return strings.TrimPrefix(p.srv.URL, "http://") }

// Add adds a rule; the first matching rule applies.
func (p *FaultProxy) Add(r *Rule) *Rule {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rules = append(p.rules, r)
	return r
}

// Clear removes every rule.
func (p *FaultProxy) Clear() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rules = nil
}

// Hits is how many requests r broke.
func (p *FaultProxy) Hits(r *Rule) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return r.hits
}

func (p *FaultProxy) match(r *http.Request) (*Rule, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.requests++
	target := r.URL.Path + "?" + r.URL.RawQuery
	for _, ru := range p.rules {
		if ru.Method != "" && ru.Method != r.Method || !strings.Contains(target, ru.Contains) {
			continue
		}
		ru.seen++
		if ru.seen >= ru.From && (ru.To == 0 || ru.seen <= ru.To) {
			ru.hits++
			return ru, true
		}
	}
	return nil, false
}

func (p *FaultProxy) track(d int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.inflight += d
	p.maxInflight = max(p.maxInflight, p.inflight)
}

func s3Error(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(status)
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>%s</Message></Error>`, code, msg)
}

// cut closes the client's connection with a reset, without an answer.
func cut(w http.ResponseWriter) {
	c, _, err := w.(http.Hijacker).Hijack()
	if err != nil {
		return
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

var errCut = errors.New("proxy cut the upload")

func (p *FaultProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.track(1)
	defer p.track(-1)
	p.mu.Lock()
	delay, skew := p.delay, p.skew
	p.mu.Unlock()
	if delay > 0 {
		time.Sleep(delay)
	}
	ru, hit := p.match(r)
	var act Action
	if hit {
		act = ru.Act
		switch act {
		case Fail:
			io.Copy(io.Discard, r.Body)
			s3Error(w, ru.Status, ru.Code, "Injected "+ru.Code+".")
			return
		case SlowDown:
			io.Copy(io.Discard, r.Body)
			s3Error(w, http.StatusServiceUnavailable, "SlowDown", "Please reduce your request rate.")
			return
		case ServerError:
			io.Copy(io.Discard, r.Body)
			s3Error(w, http.StatusInternalServerError, "InternalError", "We encountered an internal error. Please try again.")
			return
		case NotFound:
			io.Copy(io.Discard, r.Body)
			s3Error(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
			return
		case FakeOK:
			io.Copy(io.Discard, r.Body)
			w.Header().Set("ETag", `"00000000000000000000000000000000"`)
			w.WriteHeader(http.StatusOK)
			return
		case DropRequest:
			io.Copy(io.Discard, r.Body)
			cut(w)
			return
		case Hang:
			io.Copy(io.Discard, r.Body)
			select {
			case <-r.Context().Done():
			case <-time.After(time.Minute):
			}
			return
		}
	}
	if hit && act == Hold {
		p.mu.Lock()
		release := p.release
		p.mu.Unlock()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
	}
	out := r.Clone(r.Context())
	out.URL.Scheme, out.URL.Host, out.RequestURI = "http", p.target, ""
	out.Host = r.Host // the signature covers the Host the client used
	switch {
	case hit && act == CutUpload:
		out.Body = io.NopCloser(io.MultiReader(io.LimitReader(r.Body, r.ContentLength/2), errReader{}))
	case hit && act == Corrupt:
		body, err := io.ReadAll(r.Body)
		if err != nil {
			cut(w)
			return
		}
		if len(body) > 0 {
			body[len(body)/2] ^= 0x01
		}
		out.Body = io.NopCloser(bytes.NewReader(body))
	}
	resp, err := p.tr.RoundTrip(out)
	if hit && act == CutUpload {
		if err == nil {
			resp.Body.Close()
		}
		cut(w)
		return
	}
	if err != nil {
		cut(w)
		return
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		cut(w)
		return
	}
	if skew != 0 {
		body = shift(skew, resp.Header, body)
	}
	switch {
	case hit && act == DropResponse:
		cut(w)
	case hit && act == CutDownload:
		c, bw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		writeRaw(bw, resp, body[:len(body)/2])
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
	default:
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		if r.Method != http.MethodHead {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		}
		w.WriteHeader(resp.StatusCode)
		w.Write(body)
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errCut }

// writeRaw writes a response whose headers promise the full body but whose
// body is only part.
func writeRaw(bw *bufio.ReadWriter, resp *http.Response, part []byte) {
	fmt.Fprintf(bw, "HTTP/1.1 %s\r\n", resp.Status)
	resp.Header.Write(bw)
	fmt.Fprintf(bw, "\r\n")
	bw.Write(part)
	bw.Flush()
}

var xmlTime = regexp.MustCompile(`<(LastModified|Initiated)>([^<]+)</(LastModified|Initiated)>`)

// shift moves the store's clock: Date, Last-Modified and the timestamps in
// listings.
func shift(skew time.Duration, h http.Header, body []byte) []byte {
	for _, k := range []string{"Date", "Last-Modified"} {
		if t, err := http.ParseTime(h.Get(k)); err == nil {
			h.Set(k, t.Add(skew).UTC().Format(http.TimeFormat))
		}
	}
	return xmlTime.ReplaceAllFunc(body, func(m []byte) []byte {
		sm := xmlTime.FindSubmatch(m)
		t, err := time.Parse(time.RFC3339Nano, string(sm[2]))
		if err != nil {
			return m
		}
		return bytes.Join([][]byte{[]byte("<" + string(sm[1]) + ">"), []byte(t.Add(skew).UTC().Format(time.RFC3339Nano)), []byte("</" + string(sm[1]) + ">")}, nil)
	})
}

// SetSkew moves the store's clock by d in every timestamp it returns.
func (p *FaultProxy) SetSkew(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.skew = d
}

// SetDelay delays every request by d (to make requests overlap).
func (p *FaultProxy) SetDelay(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.delay = d
}

// MaxInflight returns the most requests in flight at once since the last
// call, and starts counting again.
func (p *FaultProxy) MaxInflight() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.maxInflight
	p.maxInflight = p.inflight
	return n
}

// Release lets every request held by a Hold rule go on; later ones are
// held again.
func (p *FaultProxy) Release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	close(p.release)
	p.release = make(chan struct{})
}
