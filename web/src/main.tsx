// The page's entry point.
import { render } from 'preact';
import './styles.css';
import { App } from './views/App';

const root = document.getElementById('app');
if (root) render(<App />, root);
