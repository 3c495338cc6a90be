package repo

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/mem"
)

func keyNames(t *testing.T, be backend.Backend) []string {
	t.Helper()
	var names []string
	be.List(context.Background(), backend.KindKeys, "", func(fi backend.Info) error { names = append(names, fi.Name); return nil })
	return names
}

// TestKeyFileDamage flips every byte of a key file in turn: with the right
// password, the repository either still opens (the flip changed nothing
// that matters) or the damage is reported as damage (errs.ErrCorrupt),
// never as a wrong password; with a wrong password, damage found is still
// reported as damage.
func TestKeyFileDamage(t *testing.T) {
	ctx := context.Background()
	_, be := newTestRepo(t, EncryptionAESGCM)
	names := keyNames(t, be)
	h := backend.Handle{Kind: backend.KindKeys, Name: names[0]}
	orig, _ := be.Get(ctx, h, 0, -1)
	detected := 0
	for i := range orig {
		b := append([]byte(nil), orig...)
		b[i] ^= 0x01
		be.Put(ctx, h, b)
		r, err := Open(ctx, be, pw("secret"))
		if err == nil {
			r.Close()
			continue
		}
		if !errors.Is(err, errs.ErrCorrupt) || errors.Is(err, errs.ErrAuth) || strings.Contains(err.Error(), "wrong password") {
			t.Fatalf("byte %d (%q) flipped, right password: %v; want damage reported (ErrCorrupt), not a wrong password", i, orig[i], err)
		}
		detected++
		if _, err := Open(ctx, be, pw("wrong")); !errors.Is(err, errs.ErrCorrupt) || errors.Is(err, errs.ErrAuth) {
			t.Fatalf("byte %d flipped, wrong password: %v; want damage reported", i, err)
		}
		if i == len(orig)/2 && !strings.Contains(err.Error(), "damaged") {
			t.Errorf("middle byte flipped: message %q does not say the key file is damaged", err)
		}
	}
	if detected < len(orig)*9/10 {
		t.Errorf("only %d of %d flipped bytes were detected", detected, len(orig))
	}
	be.Put(ctx, h, orig)

	// Two key files, one damaged: the other's password still opens the
	// repository; the damaged one's password reports the damage and says
	// it opens no other key file.
	r, err := Open(ctx, be, pw("secret"))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.putKey(ctx, &masterKeys{RepoID: r.cfg.ID, Encrypt: r.codec.encKey, MAC: r.codec.macKey}, []byte("second"), *testKDF); err != nil {
		t.Fatal(err)
	}
	b := append([]byte(nil), orig...)
	b[len(b)/2] ^= 0x01
	be.Put(ctx, h, b)
	if r2, err := Open(ctx, be, pw("second")); err != nil {
		t.Fatalf("undamaged key file's password: %v", err)
	} else {
		r2.Close()
	}
	_, err = Open(ctx, be, pw("secret"))
	if !errors.Is(err, errs.ErrCorrupt) || !strings.Contains(err.Error(), "none of the other 1 key files") || !strings.Contains(err.Error(), names[0]) {
		t.Fatalf("damaged key file's password: %v", err)
	}
}

// TestLegacyKeyFile: a key file written before key files had a checksum
// still opens; damage to it cannot be told from a wrong password, and the
// message says so.
func TestLegacyKeyFile(t *testing.T) {
	ctx := context.Background()
	be := mem.New()
	r, err := Init(ctx, be, InitOptions{Password: []byte("secret"), KDF: testKDF, ChunkSize: MinChunkSize})
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	h := backend.Handle{Kind: backend.KindKeys, Name: keyNames(t, be)[0]}
	raw, _ := be.Get(ctx, h, 0, -1)
	var kf keyFile
	if err := json.Unmarshal(raw, &kf); err != nil || kf.Check == "" {
		t.Fatalf("new key file has no checksum: %v %s", err, raw)
	}
	kf.Check = ""
	legacy, _ := json.MarshalIndent(kf, "", "  ")
	be.Put(ctx, h, legacy)
	r2, err := Open(ctx, be, pw("secret"))
	if err != nil {
		t.Fatalf("key file without checksum: %v", err)
	}
	r2.Close()
	kf.Data[3] ^= 1
	damaged, _ := json.MarshalIndent(kf, "", "  ")
	be.Put(ctx, h, damaged)
	if _, err := Open(ctx, be, pw("secret")); !errors.Is(err, errs.ErrAuth) || !strings.Contains(err.Error(), "without a checksum") {
		t.Fatalf("damaged key file without checksum: %v", err)
	}
}

// TestChangePasswordAfterInterrupted: a repo passwd interrupted between
// writing the new key file and removing the old leaves two key files, and
// both passwords open the repository. Whichever of them the next passwd
// starts from, afterwards only its new password opens the repository: the
// repository has one password, so passwd removes every other key file.
func TestChangePasswordAfterInterrupted(t *testing.T) {
	for _, from := range []string{"old", "new"} {
		t.Run("from the "+from+" password", func(t *testing.T) {
			ctx := context.Background()
			r, be := newTestRepo(t, EncryptionAESGCM) // password "secret"
			// What the interrupted passwd from "secret" to "second" left.
			if _, err := r.putKey(ctx, &masterKeys{RepoID: r.cfg.ID, Encrypt: r.codec.encKey, MAC: r.codec.macKey}, []byte("second"), *testKDF); err != nil {
				t.Fatal(err)
			}
			start := map[string]string{"old": "secret", "new": "second"}[from]
			r2, err := Open(ctx, be, pw(start))
			if err != nil {
				t.Fatal(err)
			}
			defer r2.Close()
			name, err := r2.ChangePassword(ctx, []byte("third"), testKDF)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{"secret", "second"} {
				if _, err := Open(ctx, be, pw(p)); !errors.Is(err, errs.ErrAuth) {
					t.Errorf("password %q after passwd to \"third\": %v, want ErrAuth", p, err)
				}
			}
			r3, err := Open(ctx, be, pw("third"))
			if err != nil {
				t.Fatal(err)
			}
			r3.Close()
			var names []string
			be.List(ctx, backend.KindKeys, "", func(fi backend.Info) error { names = append(names, fi.Name); return nil })
			if len(names) != 1 || names[0] != name {
				t.Errorf("key files %q after passwd, want only the new %s", names, name)
			}
		})
	}
}
