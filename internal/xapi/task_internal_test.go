package xapi

import (
	"encoding/json"
	"testing"
)

func TestParseTaskResult(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"OpaqueRef:abc", "OpaqueRef:abc"},
		{"<value>OpaqueRef:abc</value>", "OpaqueRef:abc"},
		{" <value><string>hello</string></value>\n", "hello"},
		{"<value/>", ""},
	}
	for _, tt := range tests {
		got, err := parseTaskResult(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("parseTaskResult(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"<value><array><data/></array></value>", "<value>unclosed"} {
		if _, err := parseTaskResult(bad); err == nil {
			t.Errorf("parseTaskResult(%q) accepted", bad)
		}
	}
}

func TestIntUnmarshal(t *testing.T) {
	var v struct{ A, B Int }
	if err := json.Unmarshal([]byte(`{"A": 10737418240, "B": "42"}`), &v); err != nil || v.A != 10737418240 || v.B != 42 {
		t.Fatalf("%+v %v", v, err)
	}
	if err := json.Unmarshal([]byte(`{"A": 1.5}`), &v); err == nil {
		t.Fatal("1.5 accepted as an int")
	}
}
