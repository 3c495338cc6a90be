package instant_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/instant"
	"github.com/vmshadow/vmshadow/internal/nbd"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
)

// TestServerServesBackup: the server built from a backup serves each disk
// as it was, writes go to an overlay that Close removes (and overlays of
// killed serves go first), and a manifest unlike its index is refused
// before anything is served.
func TestServerServesBackup(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(ctx, be, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: repo.MinChunkSize})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	img := make([]byte, 3*repo.MinChunkSize+4096)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range img[:len(img)/2] {
		img[i] = byte(rng.Uint32())
	}
	p := filepath.Join(dir, "img")
	if err := os.WriteFile(p, img, 0o600); err != nil {
		t.Fatal(err)
	}
	im, err := imagefile.Open("sda", p)
	if err != nil {
		t.Fatal(err)
	}
	res, err := backup.Run(ctx, r, backup.Job{VM: "vm", Disks: []backup.Disk{{Source: im}}}, backup.Options{})
	im.Close()
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.LoadManifest(ctx, res.ID)
	if err != nil {
		t.Fatal(err)
	}
	ovDir := filepath.Join(dir, "overlays")
	// What a killed serve left: removed before the new overlays are made.
	os.MkdirAll(ovDir, 0o700)
	if err := os.WriteFile(filepath.Join(ovDir, "dead-sda-1"+instant.OverlaySuffix), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv, err := instant.NewServer(ctx, r, res.ID, m, instant.ServeOptions{Disks: m.Disks, CacheBytes: 1 << 20, Writable: true, OverlayDir: ovDir})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	c, err := nbd.DialURI(ctx, "nbd+unix:///sda?socket="+sock, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, c.Size())
	if _, err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if !bytes.Equal(got, img) {
		t.Fatal("served disk differs from the backed-up image")
	}
	if ents, _ := os.ReadDir(ovDir); len(ents) != 1 {
		t.Fatalf("overlays while serving: %v, want one", ents)
	}
	srv.Shutdown(ctx)
	srv.Close()
	if ents, _ := os.ReadDir(ovDir); len(ents) != 0 {
		t.Fatalf("overlays after Close: %v, want none", ents)
	}

	wrong := m.Disks[0]
	wrong.Size--
	if _, err := instant.NewServer(ctx, r, res.ID, m, instant.ServeOptions{Disks: []repo.ManifestDisk{wrong}, Writable: true, OverlayDir: ovDir}); !errors.Is(err, errs.ErrCorrupt) {
		t.Fatalf("manifest size unlike the index: %v, want ErrCorrupt", err)
	}
	if ents, _ := os.ReadDir(ovDir); len(ents) != 0 {
		t.Fatalf("overlays after a refused server: %v, want none", ents)
	}
}
