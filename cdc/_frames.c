/* Capture's reads of the replication stream, many frames a call.
 *
 * cdc/stream.py reads one CopyData frame a call through psycopg: a bytes object, a
 * memoryview, a struct unpack and a tuple for each row change before the decoder sees it.
 * read() here takes what libpq has already buffered, frame after frame, and hands each
 * XLogData payload straight from libpq's buffer to the compiled wal2json decoder
 * (cdc/_wal2json.c, through its capsule), so a row change costs one RowChange object.
 *
 * A transaction's begin and commit come decoded the same way, and a commit ends the
 * batch: capture sees every transaction's end between two calls, and a transaction of a
 * few rows costs one call.  Everything else (a keepalive, a message, a row the compiled
 * decoder leaves to Python) goes through the Python parser given to setup() as the whole
 * frame, and ends the batch too.
 *
 * libpq's functions come as addresses from Python (cdc/stream.py finds the libpq
 * psycopg uses), so this file links against nothing.  It never blocks: PQgetCopyData is
 * called in its async mode, and waiting for the socket stays in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int (*get_copy_data_fn)(void *conn, char **buffer, int async);
typedef void (*freemem_fn)(void *ptr);
typedef PyObject *(*decode_fn)(const char *data, Py_ssize_t size);

static get_copy_data_fn get_copy_data = NULL;
static freemem_fn freemem = NULL;
static decode_fn decode_buf = NULL;
static PyObject *parse_frame = NULL; /* cdc.stream.parse_frame: bytes -> XLogData | Keepalive */

/* PQfreemem, with any exception of the frame's kept aside (a PQfreemem that runs Python,
   as the tests' does, must not find one pending). */
static void release(char *buf) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    freemem(buf);
    PyErr_Restore(type, value, traceback);
}

#define XLOG_HEADER 25         /* 'w', start LSN, end LSN, send time */
#define BATCH_BYTES (1 << 20) /* a batch ends past this much: wide rows come a few at a time */

#define ACTION_AT (XLOG_HEADER + 11) /* {"action":"X */

/* The item for one frame: what the compiled decoder made of it (a RowChange, a Begin or a
   Commit; *row = 1, but for a Commit, which ends the batch), else what parse_frame makes
   of the whole frame. */
static PyObject *frame_item(const char *buf, int size, int *row) {
    *row = 0;
    if (size > XLOG_HEADER && buf[0] == 'w') {
        PyObject *decoded = decode_buf(buf + XLOG_HEADER, (Py_ssize_t)size - XLOG_HEADER);
        if (decoded == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_ValueError)) return NULL;
            PyErr_Clear(); /* the Python decoder decides, and names the fault */
        } else if (decoded != Py_None) {
            *row = buf[ACTION_AT] != 'C'; /* (decoded: the message starts as wal2json's do) */
            return decoded;
        } else {
            Py_DECREF(decoded);
        }
    }
    PyObject *frame = PyBytes_FromStringAndSize(buf, size);
    if (frame == NULL) return NULL;
    PyObject *item = PyObject_CallOneArg(parse_frame, frame);
    Py_DECREF(frame);
    return item;
}

/* read(conn, limit) -> (items, status): up to `limit` frames libpq has buffered (and
   about BATCH_BYTES of them); status is PQgetCopyData's last answer when it stopped the
   batch (0: nothing buffered, -1: the server ended COPY, -2: an error), or 1 when the
   batch ended at a frame or a limit. */
static PyObject *read_frames(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "Kn", &address, &limit)) return NULL;
    if (get_copy_data == NULL || decode_buf == NULL || parse_frame == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_frames.setup() was not called");
        return NULL;
    }
    void *conn = (void *)(uintptr_t)address;
    PyObject *items = PyList_New(0);
    if (items == NULL) return NULL;
    int status = 1;
    size_t taken = 0;
    while (PyList_GET_SIZE(items) < limit && taken < BATCH_BYTES) {
        char *buf = NULL;
        int size = get_copy_data(conn, &buf, 1);
        if (size <= 0) {
            if (buf != NULL) release(buf);
            status = size;
            break;
        }
        int row;
        taken += (size_t)size;
        PyObject *item = frame_item(buf, size, &row);
        release(buf);
        if (item == NULL || PyList_Append(items, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(items);
            return NULL;
        }
        Py_DECREF(item);
        if (!row) break; /* a transaction's end, a keepalive: capture looks up */
    }
    PyObject *result = Py_BuildValue("(Ni)", items, status);
    return result;
}

static PyObject *setup(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long get_copy_data_at, freemem_at;
    PyObject *parser, *decoder_module;
    if (!PyArg_ParseTuple(args, "KKOO", &get_copy_data_at, &freemem_at, &parser, &decoder_module)) return NULL;
    if (get_copy_data_at == 0 || freemem_at == 0) {
        PyErr_SetString(PyExc_ValueError, "setup() needs libpq's PQgetCopyData and PQfreemem");
        return NULL;
    }
    if (!PyCallable_Check(parser)) {
        PyErr_SetString(PyExc_TypeError, "setup() needs the frame parser");
        return NULL;
    }
    PyObject *capsule = PyObject_GetAttrString(decoder_module, "decode_buf");
    if (capsule == NULL) return NULL;
    decode_fn decoder = (decode_fn)PyCapsule_GetPointer(capsule, "cdc._wal2json.decode_buf");
    Py_DECREF(capsule);
    if (decoder == NULL) return NULL;
    get_copy_data = (get_copy_data_fn)(uintptr_t)get_copy_data_at;
    freemem = (freemem_fn)(uintptr_t)freemem_at;
    decode_buf = decoder;
    Py_INCREF(parser);
    Py_XSETREF(parse_frame, parser);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"read", read_frames, METH_VARARGS, "read(conn, limit) -> (items, status): the frames libpq has buffered."},
    {"setup", setup, METH_VARARGS,
     "setup(PQgetCopyData, PQfreemem, parse_frame, cdc._wal2json): libpq's functions, the parser, the decoder."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_frames", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__frames(void) { return PyModule_Create(&module); }
