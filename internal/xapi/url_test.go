package xapi

import (
	"errors"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// TestParseURLRedacts: a rejected pool URL is a usage error that repeats
// neither its user info nor its query.
func TestParseURLRedacts(t *testing.T) {
	for _, s := range []string{
		"http://root:SECRET@pool",
		"ftp://pool/?session_id=SECRET",
		"https://root:SECRET@pool",
		"https://pool/?session_id=SECRET",
		"https://pool:99999999/x?SECRET",
		"https://pool/#SECRET",
		"pool?SECRET",
	} {
		_, err := ParseURL(s, false)
		if err == nil || !errors.Is(err, errs.ErrUsage) {
			t.Errorf("ParseURL(%q) = %v, want a usage error", s, err)
			continue
		}
		if strings.Contains(err.Error(), "SECRET") {
			t.Errorf("ParseURL(%q): error shows the secret: %v", s, err)
		}
	}
	if u, err := ParseURL("https://pool:8443", false); err != nil || u.String() != "https://pool:8443" {
		t.Errorf("ParseURL(https://pool:8443) = %v, %v", u, err)
	}
}
