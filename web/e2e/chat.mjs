// What the chat runs (run.mjs, features.mjs) do to the page as a person would: sign in with a
// pasted token, pick from a picker, send a message, wait for the answer to finish.

import { STEP, assert } from './harness.mjs';

/** Opens the relay's page and signs in with a pasted client token. */
export async function signIn(page, relay, token) {
  await page.goto(`${relay}/`);
  await page.getByLabel(/client token/i).fill(token);
  await page.getByRole('button', { name: 'Sign in with this token' }).click();
  await page.getByTestId('new-chat').waitFor({ timeout: STEP });
}

/** Types `text` in the message box and presses Enter. */
export async function send(page, text) {
  await page.getByTestId('input').fill(text);
  await page.getByTestId('input').press('Enter');
}

/** Waits until the current answer is finished (Send is back) and returns its text. */
export async function finished(page) {
  await page.getByTestId('send').waitFor({ timeout: STEP });
  return page.getByTestId('answer').last().innerText();
}

/** Picks the first option of picker `testId` whose value or label matches `pattern`, waiting
 * for it to be offered (the lists come from the relay). */
export async function choose(page, testId, pattern) {
  const select = page.getByTestId(testId);
  await select.waitFor({ timeout: STEP });
  const deadline = Date.now() + STEP;
  for (;;) {
    const options = await select.locator('option').evaluateAll((os) => os.map((o) => [o.value, o.textContent]));
    const hit = options.find(([value, label]) => pattern.test(value) || pattern.test(label));
    if (hit) {
      await select.selectOption(hit[0]);
      return hit;
    }
    assert(Date.now() < deadline, `${testId} never offered ${pattern}: ${JSON.stringify(options)}`);
    await page.waitForTimeout(200);
  }
}
