package xapi_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/xapi"
)

// TestPeerWaitsHaveDeadlines is the rule "every peer wait has a deadline"
// for XAPI: a pool master that accepts and stalls, takes the request and
// never answers, or answers garbage fails the call within CallTimeout
// (with a context that has no deadline), with errs.ErrConnect naming the host.
func TestPeerWaitsHaveDeadlines(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc // nil: a raw listener that accepts and says nothing
		want    string
	}{
		{"accept and stall", nil, "no answer within"},
		{"take the request, never answer", func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			<-r.Context().Done()
		}, "no answer within"},
		{"answer half, then stall", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", "1000")
			w.Write([]byte(`{"jsonrpc": "2.0", "result": `))
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}, "no answer within"},
		{"answer garbage", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("\x00\x01 not JSON"))
		}, "not JSON-RPC"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var url string
			if tt.handler == nil {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
				go func() {
					for {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						defer c.Close()
					}
				}()
				url = "http://" + ln.Addr().String()
			} else {
				srv := httptest.NewServer(tt.handler)
				defer srv.Close()
				defer srv.CloseClientConnections()
				url = srv.URL
			}
			start := time.Now()
			_, err := xapi.Login(context.Background(), xapi.Config{URL: url, User: "root", Password: []byte("pw"),
				TLS: &tls.Config{InsecureSkipVerify: true}, CallTimeout: 500 * time.Millisecond})
			if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), strings.TrimPrefix(url, "http://")) {
				t.Fatalf("err = %v, want errs.ErrConnect with %q and the host", err, tt.want)
			}
			if strings.Contains(err.Error(), "pw") {
				t.Fatalf("the password is in the error: %v", err)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("took %s", d)
			}
		})
	}
}
