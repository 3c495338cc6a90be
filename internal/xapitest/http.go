package xapitest

import (
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// sessionOf finds the request's session: the session_id query parameter or
// cookie, as xapi's HTTP handlers accept it.
func sessionOf(r *http.Request) string {
	if s := r.URL.Query().Get("session_id"); s != "" {
		return s
	}
	if c, err := r.Cookie("session_id"); err == nil {
		return c.Value
	}
	return ""
}

// findVDILocked resolves a VDI given by reference or UUID.
func (s *Server) findVDILocked(x string) *vdi {
	if d := s.vdis[x]; d != nil {
		return d
	}
	for _, d := range s.vdis {
		if d.uuid == x {
			return d
		}
	}
	return nil
}

func (s *Server) finishTask(ref, result string, errInfo ...string) {
	if t := s.tasks[ref]; t != nil {
		if len(errInfo) > 0 {
			t.status, t.errorInfo = "failure", errInfo
		} else {
			t.status, t.result, t.progress = "success", result, 1
		}
	}
}

// serveImport is PUT /import_raw_vdi?session_id=&task_id=&vdi=&format=raw
// [&chunked]: as xapi's import_raw_vdi.ml, it answers 200 (Connection:
// close) before reading the data, refuses chunked transfer encoding, and
// reports the outcome in the task.
func (s *Server) serveImport(w http.ResponseWriter, r *http.Request) { s.serveImportOn(w, r, s.host) }

// redirected answers, as a host that cannot see the VDI's SR, with a 302
// to the host that can (importexport.ml, return_302_redirect).
func (s *Server) redirected(w http.ResponseWriter, r *http.Request, on *host, d *vdi) bool {
	if d == nil {
		return false
	}
	h := s.hostOfVDILocked(d)
	if h == on {
		return false
	}
	to := *r.URL
	to.Scheme, to.Host = "https", h.address
	if h == s.member {
		to.Host = strings.TrimPrefix(s.MemberURL, "https://")
	} else {
		to.Host = strings.TrimPrefix(s.URL, "https://")
	}
	http.Redirect(w, r, to.String(), http.StatusFound)
	return true
}

func (s *Server) serveImportOn(w http.ResponseWriter, r *http.Request, on *host) {
	s.mu.Lock()
	s.calls = append(s.calls, "PUT /import_raw_vdi")
	if r.Method != http.MethodPut {
		s.mu.Unlock()
		http.Error(w, "PUT only", http.StatusMethodNotAllowed)
		return
	}
	if _, ok := s.sessions[sessionOf(r)]; !ok || s.permitted("PUT /import_raw_vdi") != nil {
		s.mu.Unlock()
		http.Error(w, "forbidden", http.StatusForbidden)
		return
	}
	q := r.URL.Query()
	taskRef := q.Get("task_id")
	d := s.findVDILocked(q.Get("vdi"))
	if s.redirected(w, r, on, d) {
		s.mu.Unlock()
		return
	}
	var errInfo []string
	switch {
	case d == nil || d.path == "":
		errInfo = []string{"VDI_MISSING", "", q.Get("vdi")}
	case q.Get("format") != "" && q.Get("format") != "raw":
		errInfo = []string{"INTERNAL_ERROR", "Unknown format " + q.Get("format")}
	case len(r.TransferEncoding) > 0:
		errInfo = []string{"INTERNAL_ERROR", "Cannot handle encoding: chunked"}
	case r.ContentLength < 0 || r.ContentLength > d.size && !q.Has("chunked"):
		errInfo = []string{"INTERNAL_ERROR", fmt.Sprintf("content length %d does not fit the VDI's %d bytes", r.ContentLength, d.size)}
	}
	if errInfo != nil {
		s.finishTask(taskRef, "", errInfo...)
		s.mu.Unlock()
		http.Error(w, "not found", http.StatusNotFound)
		return
	}
	path, size, ref := d.path, d.size, d.ref
	s.mu.Unlock()

	http.NewResponseController(w).EnableFullDuplex()
	w.Header().Set("Connection", "close")
	w.Header().Set("Task-Id", taskRef)
	w.WriteHeader(http.StatusOK)
	http.NewResponseController(w).Flush()
	err := receive(r.Body, path, size, q.Has("chunked"))
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.finishTask(taskRef, "", "INTERNAL_ERROR", "import: "+err.Error())
		return
	}
	s.finishTask(taskRef, "<value>"+ref+"</value>")
}

// receive writes an upload into the VDI file: the raw image from offset 0,
// or vhd-tool's chunked frames (uint64 offset, uint32 length, data; a zero
// frame ends the stream).
func receive(body io.Reader, path string, size int64, chunked bool) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if !chunked {
		n, err := io.Copy(&offsetWriter{f: f}, body)
		if err != nil {
			return fmt.Errorf("after %d bytes: %w", n, err)
		}
		return f.Sync()
	}
	var hdr [12]byte
	for {
		if _, err := io.ReadFull(body, hdr[:]); err != nil {
			return fmt.Errorf("chunk header: %w", err)
		}
		off, n := int64(binary.LittleEndian.Uint64(hdr[:8])), int64(binary.LittleEndian.Uint32(hdr[8:]))
		if off == 0 && n == 0 {
			return f.Sync()
		}
		if off < 0 || off+n > size {
			return fmt.Errorf("chunk %d+%d outside the %d-byte VDI", off, n, size)
		}
		if _, err := io.Copy(io.NewOffsetWriter(f, off), io.LimitReader(body, n)); err != nil {
			return err
		}
	}
}

type offsetWriter struct {
	f   *os.File
	off int64
}

func (o *offsetWriter) Write(p []byte) (int, error) {
	n, err := o.f.WriteAt(p, o.off)
	o.off += int64(n)
	return n, err
}

// serveExport is GET /export_raw_vdi?session_id=&vdi=&format=raw|vhd.
func (s *Server) serveExport(w http.ResponseWriter, r *http.Request) { s.serveExportOn(w, r, s.host) }

func (s *Server) serveExportOn(w http.ResponseWriter, r *http.Request, on *host) {
	s.mu.Lock()
	s.calls = append(s.calls, "GET /export_raw_vdi")
	if _, ok := s.sessions[sessionOf(r)]; !ok || s.permitted("GET /export_raw_vdi") != nil {
		s.mu.Unlock()
		http.Error(w, "forbidden", http.StatusForbidden)
		return
	}
	d := s.findVDILocked(r.URL.Query().Get("vdi"))
	if d == nil || d.path == "" {
		s.mu.Unlock()
		http.Error(w, "no such VDI", http.StatusNotFound)
		return
	}
	if s.redirected(w, r, on, d) {
		s.mu.Unlock()
		return
	}
	path, size := d.path, d.size
	dir := s.dir
	s.mu.Unlock()
	switch format := r.URL.Query().Get("format"); format {
	case "", "raw":
	case "vhd":
		// As export_raw_vdi.ml with vhd-tool: the VDI as a dynamic VHD,
		// footer, header and block allocation table first, only the
		// allocated blocks after them. qemu-img's vpc driver writes that
		// layout and leaves blocks of zeros unallocated.
		tmp, err := os.CreateTemp(dir, "export-*.vhd")
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		tmp.Close()
		defer os.Remove(tmp.Name())
		out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", path, tmp.Name()).CombinedOutput()
		if err != nil {
			http.Error(w, fmt.Sprintf("qemu-img: %v: %s", err, out), http.StatusInternalServerError)
			return
		}
		path, size = tmp.Name(), -1
	default:
		http.Error(w, "Unknown format "+format, http.StatusNotFound)
		return
	}
	f, err := os.Open(path)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	if size < 0 {
		fi, err := f.Stat()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		size = fi.Size()
	}
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.Header().Set("Content-Type", "application/octet-stream")
	io.Copy(w, io.NewSectionReader(f, 0, size))
}
