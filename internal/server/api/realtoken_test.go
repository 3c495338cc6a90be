package api_test

import (
	"context"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// dbAuth is the fake service with the real token store.
type dbAuth struct {
	*fake
	db *state.DB
}

func (s dbAuth) Authenticate(ctx context.Context, secret string) (*state.Token, error) {
	return s.db.Authenticate(ctx, secret, time.Now())
}

// TestRealTokens: tokens of a real state database through the handler:
// roles enforced, a revoked token refused.
func TestRealTokens(t *testing.T) {
	ctx := context.Background()
	db, err := state.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	viewer, err := db.CreateToken(ctx, "grafana", state.Viewer, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	admin, err := db.CreateToken(ctx, "ops", state.Admin, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	wrong := viewer[:len(viewer)-1] + "0"
	if wrong == viewer {
		wrong = viewer[:len(viewer)-1] + "1"
	}
	h := api.New(dbAuth{newFake(), db}, api.Options{})
	const del = "/api/v1/repositories/local/backups/ab12"
	for _, tc := range []struct {
		method, path, tok string
		status            int
	}{
		{"GET", "/api/v1/vms", viewer, 200},
		{"DELETE", del, viewer, 403},
		{"POST", "/api/v1/jobs/nightly/run", viewer, 403},
		{"DELETE", del, admin, 204},
		{"GET", "/api/v1/vms", wrong, 401},
	} {
		if w := do(h, tc.method, tc.path, tc.tok, ""); w.Code != tc.status {
			t.Errorf("%s %s: %d, want %d: %s", tc.method, tc.path, w.Code, tc.status, w.Body)
		}
	}
	if err := db.RevokeToken(ctx, "ops", time.Now()); err != nil {
		t.Fatal(err)
	}
	if w := do(h, "DELETE", del, admin, ""); w.Code != 401 {
		t.Errorf("revoked admin token: %d, want 401", w.Code)
	}
	if w := do(h, "GET", "/api/v1/vms", viewer, ""); w.Code != 200 {
		t.Errorf("viewer after revoking ops: %d", w.Code)
	}
}
