# A long-lived taskq handler: `taskq worker --pipe -- python3 examples/pipe_square.py`
import json, sys

for line in sys.stdin:  # one task per line; stdin closes at shutdown
    task = json.loads(line)
    try:
        answer = {"id": task["id"], "output": str(int(task["payload"]) ** 2)}
    except (KeyError, ValueError) as error:  # binary (payload_base64) or not a number
        answer = {"id": task["id"], "error": f"not an integer: {error}", "retry": False}
    print(json.dumps(answer), flush=True)
