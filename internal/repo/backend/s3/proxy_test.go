package s3

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

// faultProxy sits between the backend and the real S3 server and breaks
// chosen requests the ways networks and overloaded stores do.
type faultProxy struct {
	target string // host:port of the real server
	srv    *httptest.Server
	tr     *http.Transport

	mu          sync.Mutex
	rules       []*rule
	inflight    int
	maxInflight int
	requests    int
	skew        time.Duration // added to every timestamp the store returns
	delay       time.Duration // added before forwarding (to make requests overlap)
}

type action int

const (
	slowDown     action = iota // 503 SlowDown, after reading the body
	serverError                // 500 InternalError
	notFound                   // 404 NoSuchKey (a stale read)
	fakeOK                     // 200 without forwarding (a lost write)
	dropRequest                // read the body, close the connection (the store never saw it)
	dropResponse               // forward, then close without the answer (the store did it)
	cutUpload                  // forward half the body, then cut both connections
	cutDownload                // forward, send half of the response body, cut
	hang                       // read the body and never answer
)

// rule applies act to the from-th through to-th requests (1-based; to 0:
// all from from on) whose method and path?query match.
type rule struct {
	method   string // "" any
	contains string // substring of path?query; "" any
	from, to int
	act      action
	seen     int
	hits     int
}

func newFaultProxy(t *testing.T, target string) *faultProxy {
	p := &faultProxy{target: target, tr: &http.Transport{DisableCompression: true}}
	p.srv = httptest.NewServer(p)
	t.Cleanup(func() { p.srv.CloseClientConnections(); p.srv.Close(); p.tr.CloseIdleConnections() })
	return p
}

func (p *faultProxy) endpoint() string { return strings.TrimPrefix(p.srv.URL, "http://") }

func (p *faultProxy) add(r *rule) *rule {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rules = append(p.rules, r)
	return r
}

func (p *faultProxy) clear() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rules = nil
}

func (p *faultProxy) hits(r *rule) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return r.hits
}

func (p *faultProxy) match(r *http.Request) (action, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.requests++
	target := r.URL.Path + "?" + r.URL.RawQuery
	for _, ru := range p.rules {
		if ru.method != "" && ru.method != r.Method || !strings.Contains(target, ru.contains) {
			continue
		}
		ru.seen++
		if ru.seen >= ru.from && (ru.to == 0 || ru.seen <= ru.to) {
			ru.hits++
			return ru.act, true
		}
	}
	return 0, false
}

func (p *faultProxy) track(d int) {
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

func (p *faultProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.track(1)
	defer p.track(-1)
	if p.delay > 0 {
		time.Sleep(p.delay)
	}
	act, hit := p.match(r)
	if hit {
		switch act {
		case slowDown:
			io.Copy(io.Discard, r.Body)
			s3Error(w, http.StatusServiceUnavailable, "SlowDown", "Please reduce your request rate.")
			return
		case serverError:
			io.Copy(io.Discard, r.Body)
			s3Error(w, http.StatusInternalServerError, "InternalError", "We encountered an internal error. Please try again.")
			return
		case notFound:
			io.Copy(io.Discard, r.Body)
			s3Error(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
			return
		case fakeOK:
			io.Copy(io.Discard, r.Body)
			w.Header().Set("ETag", `"00000000000000000000000000000000"`)
			w.WriteHeader(http.StatusOK)
			return
		case dropRequest:
			io.Copy(io.Discard, r.Body)
			cut(w)
			return
		case hang:
			io.Copy(io.Discard, r.Body)
			select {
			case <-r.Context().Done():
			case <-time.After(time.Minute):
			}
			return
		}
	}
	out := r.Clone(r.Context())
	out.URL.Scheme, out.URL.Host, out.RequestURI = "http", p.target, ""
	out.Host = r.Host // the signature covers the Host the client used
	if hit && act == cutUpload {
		out.Body = io.NopCloser(io.MultiReader(io.LimitReader(r.Body, r.ContentLength/2), errReader{}))
	}
	resp, err := p.tr.RoundTrip(out)
	if hit && act == cutUpload {
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
	if p.skew != 0 {
		body = p.shift(resp.Header, body)
	}
	switch {
	case hit && act == dropResponse:
		cut(w)
	case hit && act == cutDownload:
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
func (p *faultProxy) shift(h http.Header, body []byte) []byte {
	for _, k := range []string{"Date", "Last-Modified"} {
		if t, err := http.ParseTime(h.Get(k)); err == nil {
			h.Set(k, t.Add(p.skew).UTC().Format(http.TimeFormat))
		}
	}
	return xmlTime.ReplaceAllFunc(body, func(m []byte) []byte {
		sm := xmlTime.FindSubmatch(m)
		t, err := time.Parse(time.RFC3339Nano, string(sm[2]))
		if err != nil {
			return m
		}
		return bytes.Join([][]byte{[]byte("<" + string(sm[1]) + ">"), []byte(t.Add(p.skew).UTC().Format(time.RFC3339Nano)), []byte("</" + string(sm[1]) + ">")}, nil)
	})
}
