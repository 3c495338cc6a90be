// Command walapp is the workload of the vmshadow test guest: a small
// application with a write-ahead log. It appends records in the format of
// internal/walcheck to every log file given, the same sequence number to each,
// and fsyncs them after every batch. It is the guest's VSS-style application
// writer:
//
//   - SIGUSR1: finish the current record, fsync, record the last durable
//     sequence number durably next to each log (LOG.checkpoint, the
//     application's consistency point) and in the marker file, and stop
//     writing (freeze); repeated while paused it rewrites both.
//   - SIGUSR2: remove the marker and resume (thaw).
//   - SIGTERM, SIGINT: fsync and exit 0.
//
// On start it checks the logs it finds: a partial record at the end (left by
// a crash) is cut off, a corrupt log is refused. Its state is kept in the
// status file ("seq=N durable=N state=running|paused") for the guest's
// control port. Built with CGO_ENABLED=0 into the guest's initramfs.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vmshadow/vmshadow/internal/walcheck"
)

func main() {
	interval := flag.Int("interval-ms", 10, "pause between records in milliseconds (0: none)")
	batch := flag.Int("batch", 1, "records per fsync")
	status := flag.String("status", "", "file to keep the current state in")
	marker := flag.String("marker", "/run/walapp.paused", "file written while paused")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: walapp [flags] LOG...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 || *batch < 1 || *interval < 0 {
		flag.Usage()
		os.Exit(2)
	}
	a := &app{interval: time.Duration(*interval) * time.Millisecond, batch: *batch,
		statusPath: *status, markerPath: *marker}
	if err := a.open(flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "walapp:", err)
		os.Exit(1)
	}
	if err := a.run(); err != nil {
		fmt.Fprintln(os.Stderr, "walapp:", err)
		os.Exit(1)
	}
}

type logFile struct {
	f    *os.File
	next uint64 // next sequence number this log needs
}

type app struct {
	interval   time.Duration
	batch      int
	statusPath string
	markerPath string

	logs    []*logFile
	seq     uint64 // last record written to every log
	durable uint64 // last record fsynced in every log
	buf     []byte
	lastOut time.Time
}

// open opens or creates the logs, checks what they hold and cuts a partial
// tail. Logs behind the others are caught up before new records are written.
func (a *app) open(paths []string) error {
	for _, p := range paths {
		res, err := walcheck.CheckFile(p)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("refusing to append to %s: %w", p, err)
		}
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		if res.TrailingPartial {
			fmt.Printf("walapp: %s: cutting a partial record of %d bytes after record %d\n", p, res.TrailingBytes(), res.LastSeq)
			if err := f.Truncate(res.Bytes); err != nil {
				return fmt.Errorf("truncate %s: %w", p, err)
			}
		}
		if _, err := f.Seek(res.Bytes, 0); err != nil {
			return err
		}
		// Make the new file's directory entry durable too.
		if err := syncDir(filepath.Dir(p)); err != nil {
			return err
		}
		a.logs = append(a.logs, &logFile{f: f, next: res.LastSeq + 1})
		a.seq = max(a.seq, res.LastSeq)
	}
	a.durable = a.seq
	for _, l := range a.logs {
		if err := a.catchUp(l); err != nil {
			return err
		}
	}
	if err := a.sync(); err != nil {
		return err
	}
	fmt.Printf("walapp: writing %d log(s) from record %d, batch %d, interval %v\n", len(a.logs), a.seq+1, a.batch, a.interval)
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (a *app) catchUp(l *logFile) error {
	for l.next <= a.seq {
		if err := a.write(l, l.next); err != nil {
			return err
		}
	}
	return nil
}

// write appends record seq to one log with a single write.
func (a *app) write(l *logFile, seq uint64) error {
	a.buf = walcheck.AppendRecord(a.buf[:0], seq)
	if _, err := l.f.Write(a.buf); err != nil {
		return fmt.Errorf("append record %d to %s: %w", seq, l.f.Name(), err)
	}
	l.next = seq + 1
	return nil
}

func (a *app) sync() error {
	for _, l := range a.logs {
		if err := l.f.Sync(); err != nil {
			return fmt.Errorf("fsync %s: %w", l.f.Name(), err)
		}
	}
	a.durable = a.seq
	return nil
}

func (a *app) run() error {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT)
	a.writeStatus("running", true)
	var tick <-chan time.Time
	if a.interval > 0 {
		t := time.NewTicker(a.interval)
		defer t.Stop()
		tick = t.C
	}
	for {
		// Signals are handled between records only: a record is never
		// left half written by a pause or a stop.
		select {
		case s := <-sigs:
			stop, err := a.signal(s, sigs)
			if stop || err != nil {
				return err
			}
			continue
		default:
		}
		if tick != nil {
			select {
			case <-tick:
			case s := <-sigs:
				stop, err := a.signal(s, sigs)
				if stop || err != nil {
					return err
				}
				continue
			}
		}
		a.seq++
		for _, l := range a.logs {
			if err := a.write(l, a.seq); err != nil {
				return err
			}
		}
		if a.seq%uint64(a.batch) == 0 {
			if err := a.sync(); err != nil {
				return err
			}
		}
		a.writeStatus("running", false)
	}
}

// signal handles one signal; after SIGUSR1 it stays paused here, handling
// the next signals, until SIGUSR2 or a stop. It reports whether walapp must exit.
func (a *app) signal(s os.Signal, sigs <-chan os.Signal) (bool, error) {
	paused := false
	for {
		switch s {
		case syscall.SIGTERM, syscall.SIGINT:
			if err := a.sync(); err != nil {
				return true, err
			}
			a.writeStatus("stopped", true)
			fmt.Printf("walapp: stopped at record %d\n", a.durable)
			return true, nil
		case syscall.SIGUSR1:
			if err := a.sync(); err != nil {
				return true, err
			}
			if err := a.checkpoint(); err != nil {
				return true, err
			}
			if err := writeFile(a.markerPath, fmt.Sprintf("%d\n", a.durable)); err != nil {
				return true, fmt.Errorf("write pause marker: %w", err)
			}
			a.writeStatus("paused", true)
			if !paused {
				fmt.Printf("walapp: paused at record %d\n", a.durable)
			}
			paused = true
		case syscall.SIGUSR2:
			if !paused {
				return false, nil
			}
			if err := os.Remove(a.markerPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return true, fmt.Errorf("remove pause marker: %w", err)
			}
			a.writeStatus("running", true)
			fmt.Printf("walapp: resumed after record %d\n", a.durable)
			return false, nil
		}
		s = <-sigs
	}
}

// checkpoint records, next to each log and durably, the last record made
// durable: the application's consistency point, which an
// application-consistent copy of the disk ends exactly at.
func (a *app) checkpoint() error {
	for _, l := range a.logs {
		path := walcheck.CheckpointPath(l.f.Name())
		if err := writeFile(path, fmt.Sprintf("%d\n", a.durable)); err != nil {
			return fmt.Errorf("write checkpoint: %w", err)
		}
		f, err := os.Open(path)
		if err == nil {
			err = f.Sync()
			f.Close()
		}
		if err == nil {
			err = syncDir(filepath.Dir(path))
		}
		if err != nil {
			return fmt.Errorf("sync checkpoint: %w", err)
		}
	}
	return nil
}

// writeStatus replaces the status file, at most every 100 ms unless forced.
func (a *app) writeStatus(state string, force bool) {
	if a.statusPath == "" || (!force && time.Since(a.lastOut) < 100*time.Millisecond) {
		return
	}
	a.lastOut = time.Now()
	if err := writeFile(a.statusPath, fmt.Sprintf("seq=%d durable=%d state=%s\n", a.seq, a.durable, state)); err != nil {
		fmt.Fprintln(os.Stderr, "walapp: status:", err)
	}
}

// writeFile replaces path atomically (write a temporary file, rename).
func writeFile(path, content string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
