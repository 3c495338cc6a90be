package redact

import (
	"strings"
	"testing"
)

func TestURL(t *testing.T) {
	for _, tc := range []struct {
		in   string
		keep []string
		want string
	}{
		{in: "s3:http://127.0.0.1:7391/bkt?X-Amz-Credential=SECRET", want: "s3:http://127.0.0.1:7391/bkt?..."},
		{in: "s3:https://AKIA:SECRET@host/bucket/prefix", want: "s3:https://***@host/bucket/prefix"},
		{in: "s3:AKIA:SECRET@host/bucket", want: "***@host/bucket"},
		{in: "s3:host/bucket?SECRET", want: "s3:host/bucket?..."},
		{in: "s3:http://h/b#SECRET", want: "s3:http://h/b#..."},
		{in: "s3:http://h/b?a=1#SECRET", want: "s3:http://h/b?...#..."},
		{in: "https://root:SECRET@pool/?session_id=SECRET", want: "https://***@pool/?..."},
		{in: "https://a@b:SECRET@pool", want: "https://***@pool"},
		{in: "https://pool:443", want: "https://pool:443"},
		{in: "https://pool?", want: "https://pool?"},
		{in: "ftp://h/x?SECRET", want: "ftp://h/x?..."},
		{in: "nbd+unix:///vda?socket=/run/x.sock", keep: []string{"socket"}, want: "nbd+unix:///vda?socket=/run/x.sock"},
		{in: "nbd+unix:///vda?socket=/run/x.sock&token=SECRET", keep: []string{"socket"}, want: "nbd+unix:///vda?..."},
		{in: "nbd+unix:///vda?socket=/run/x.sock", want: "nbd+unix:///vda?..."},
		{in: "nbds://xen1/%2Fvdi%3Fsession_id%3DOpaqueRef:SECRET?bogus=1", want: "nbds://xen1/%2Fvdi%3F..."},
		{in: "nbds://xen1/vdi%3fsession_id=SECRET", want: "nbds://xen1/vdi%3F..."},
		{in: "nbd:unix:/run/x.sock:exportname=vda", want: "nbd:unix:/run/x.sock:exportname=vda"},
		{in: "nbd:xen1:10809:exportname=vdi?session_id=SECRET", want: "nbd:xen1:10809:exportname=vdi?..."},
		{in: "qemu+ssh://backup@kvm1/system?keyfile=/root/.ssh/SECRET", want: "qemu+ssh://***@kvm1/system?..."},
		{in: "/var/lib/repo", want: "/var/lib/repo"},
		{in: "", want: ""},
		{in: "%zz://u:SECRET@h/%zz?SECRET", want: "%zz://***@h/%zz?..."},
	} {
		got := URL(tc.in, tc.keep...)
		if got != tc.want {
			t.Errorf("URL(%q, %q) = %q, want %q", tc.in, tc.keep, got, tc.want)
		}
		if strings.Contains(got, "SECRET") {
			t.Errorf("URL(%q) = %q shows the secret", tc.in, got)
		}
	}
}
